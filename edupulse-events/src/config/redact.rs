//! Keeping credentials out of what the library shows: `Debug`, errors and log lines
//! name servers by their URL with every secret replaced by `<redacted>`.

/// Replaces the password in `scheme://user:password@host` and any `password=`/`token=`
/// query parameter by `<redacted>`.
pub(crate) fn redact_url(url: &str) -> String {
    if url.contains(',') {
        // async-nats takes a comma-separated list of servers: redact each.
        return url.split(',').map(redact_url).collect::<Vec<_>>().join(",");
    }
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?', '#'])
            .map_or(out.len(), |i| rest_start + i);
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo = &out[rest_start..rest_start + at];
            let redacted = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:<redacted>"),
                // A lone userinfo may be a token (nats://token@host).
                None if !url.starts_with("postgres") => "<redacted>".to_owned(),
                None => userinfo.to_owned(),
            };
            out.replace_range(rest_start..rest_start + at, &redacted);
        }
    }
    if let Some(query_start) = out.find('?') {
        let (head, query) = out.split_at(query_start + 1);
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((key, _))
                    if ["password", "pass", "token", "sslpassword"]
                        .contains(&key.to_ascii_lowercase().as_str()) =>
                {
                    format!("{key}=<redacted>")
                }
                _ => param.to_owned(),
            })
            .collect();
        out = format!("{head}{}", params.join("&"));
    }
    out
}

/// Removes any secret of `url` that `text` (an error message) may quote.
pub(crate) fn redact_text(text: &str, url: &str) -> String {
    let mut out = text.replace(url, &redact_url(url));
    for secret in url_secrets(url) {
        if secret.len() >= 3 {
            out = out.replace(&secret, "<redacted>");
        }
    }
    out
}

fn url_secrets(url: &str) -> Vec<String> {
    if url.contains(',') {
        return url.split(',').flat_map(url_secrets).collect();
    }
    let mut secrets = Vec::new();
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        if let Some(at) = authority.rfind('@') {
            let userinfo = &authority[..at];
            match userinfo.split_once(':') {
                Some((_, password)) => secrets.push(password.to_owned()),
                None if !url.starts_with("postgres") => secrets.push(userinfo.to_owned()),
                None => {}
            }
        }
    }
    if let Some((_, query)) = url.split_once('?') {
        for param in query.split('&') {
            if let Some((key, value)) = param.split_once('=') {
                if ["password", "pass", "token", "sslpassword"]
                    .contains(&key.to_ascii_lowercase().as_str())
                {
                    secrets.push(value.to_owned());
                }
            }
        }
    }
    secrets
}
