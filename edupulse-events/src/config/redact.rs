//! Keeping credentials out of what the library shows: `Debug`, errors and log lines
//! name servers by their URL with every secret replaced by `<redacted>`, whatever form
//! the URL takes (with a scheme or without, a list of NATS servers, a password with
//! raw `/`, `?`, `#`, `@` or `,` in it, percent-encoded or not, a token, or a
//! `password=` query parameter).

/// Query parameters whose value is a secret (compared without case).
const SECRET_PARAMS: [&str; 7] = [
    "password",
    "pass",
    "pwd",
    "token",
    "sslpassword",
    "secret",
    "auth_token",
];

/// What stands in for a secret.
const REDACTED: &str = "<redacted>";

/// One server address, cut into what is shown and what is not.
struct Parts<'a> {
    /// `scheme://`, if there is one.
    scheme: &'a str,
    /// Between the scheme and the last `@`: `user`, `user:password` or a token.
    userinfo: Option<&'a str>,
    /// The host and everything after it.
    rest: &'a str,
}

impl<'a> Parts<'a> {
    /// The userinfo ends at the last `@`: a host never holds one, while a password
    /// may hold `@`, `/`, `?` or `#` unencoded. (An `@` in a query makes more hidden
    /// than needed, never less.)
    fn of(url: &'a str) -> Parts<'a> {
        let (scheme, after) = match url.find("://") {
            Some(end) => url.split_at(end + 3),
            None => ("", url),
        };
        match after.rfind('@') {
            Some(at) => Parts {
                scheme,
                userinfo: Some(&after[..at]),
                rest: &after[at + 1..],
            },
            None => Parts {
                scheme,
                userinfo: None,
                rest: after,
            },
        }
    }
}

/// Whether `url` is a Postgres URL: a lone userinfo there is a user, not a token, and a
/// comma does not separate servers.
fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The servers of a URL: NATS takes a comma-separated list; a Postgres URL is one.
fn servers(url: &str) -> Vec<&str> {
    if is_postgres(url) {
        vec![url]
    } else {
        url.split(',').collect()
    }
}

/// `url` with every secret replaced by `<redacted>`: the password or token of each
/// server, and secret query parameters.
pub(crate) fn redact_url(url: &str) -> String {
    let postgres = is_postgres(url);
    servers(url)
        .into_iter()
        .map(|server| redact_server(server, postgres))
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_server(server: &str, postgres: bool) -> String {
    let parts = Parts::of(server);
    let mut out = String::from(parts.scheme);
    if let Some(userinfo) = parts.userinfo {
        match userinfo.split_once(':') {
            Some((user, _)) => {
                out.push_str(user);
                out.push(':');
                out.push_str(REDACTED);
            }
            None if postgres => out.push_str(userinfo),
            // A lone userinfo is a token (nats://token@host).
            None => out.push_str(REDACTED),
        }
        out.push('@');
    }
    match parts.rest.split_once('?') {
        Some((head, query)) => {
            out.push_str(head);
            out.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((key, _)) if is_secret_param(key) => format!("{key}={REDACTED}"),
                    _ => param.to_owned(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
        None => out.push_str(parts.rest),
    }
    out
}

fn is_secret_param(key: &str) -> bool {
    SECRET_PARAMS.contains(&key.to_ascii_lowercase().as_str())
}

/// Removes from `text` (an error message) any secret of `url` it may quote: the URL
/// itself, each server of it, and each secret raw and percent-decoded.
pub(crate) fn redact_text(text: &str, url: &str) -> String {
    let mut out = text.replace(url, &redact_url(url));
    let postgres = is_postgres(url);
    for server in servers(url) {
        out = out.replace(server, &redact_server(server, postgres));
    }
    for secret in url_secrets(url) {
        for form in [percent_decode(&secret), secret] {
            // Shorter ones would replace ordinary words; the URL forms above cover them.
            if form.len() >= 3 {
                out = out.replace(&form, REDACTED);
            }
        }
    }
    out
}

/// The secrets a URL holds, as written.
fn url_secrets(url: &str) -> Vec<String> {
    let postgres = is_postgres(url);
    let mut secrets = Vec::new();
    for server in servers(url) {
        let parts = Parts::of(server);
        if let Some(userinfo) = parts.userinfo {
            match userinfo.split_once(':') {
                Some((_, password)) => secrets.push(password.to_owned()),
                None if !postgres => secrets.push(userinfo.to_owned()),
                None => {}
            }
        }
        if let Some((_, query)) = parts.rest.split_once('?') {
            for param in query.split('&') {
                if let Some((key, value)) = param.split_once('=') {
                    if is_secret_param(key) {
                        secrets.push(value.to_owned());
                    }
                }
            }
        }
    }
    secrets
}

/// Decodes `%XX` escapes (invalid ones are kept as written; invalid UTF-8 is replaced).
pub(crate) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((high * 16 + low) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Credentials written in a NATS URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UrlCredentials {
    /// `user:password@`, percent-decoded.
    UserPassword { user: String, password: String },
    /// `token@`, percent-decoded.
    Token(String),
}

/// Takes the credentials out of a NATS URL (of the first server that has them), so
/// that they reach the client as options and never stand in an address the client
/// may log. Returns the servers without user information.
pub(crate) fn split_nats_credentials(url: &str) -> (String, Option<UrlCredentials>) {
    let mut credentials = None;
    let servers: Vec<String> = url
        .split(',')
        .map(|server| {
            let parts = Parts::of(server);
            if let (Some(userinfo), None) = (parts.userinfo, &credentials) {
                credentials = Some(match userinfo.split_once(':') {
                    Some((user, password)) => UrlCredentials::UserPassword {
                        user: percent_decode(user),
                        password: percent_decode(password),
                    },
                    None => UrlCredentials::Token(percent_decode(userinfo)),
                });
            }
            format!("{}{}", parts.scheme, parts.rest)
        })
        .collect();
    (servers.join(","), credentials)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every URL form sqlx or async-nats accepts, with the secret it holds and what
    /// must stay readable.
    const FORMS: &[(&str, &str, &str)] = &[
        (
            "nats://me:s3cret@h:4222",
            "s3cret",
            "nats://me:<redacted>@h:4222",
        ),
        ("me:s3cret@h:4222", "s3cret", "me:<redacted>@h:4222"),
        (
            "tls://me:s3cret@h:4222",
            "s3cret",
            "tls://me:<redacted>@h:4222",
        ),
        ("ws://tok3n@h:80", "tok3n", "ws://<redacted>@h:80"),
        ("wss://tok3n@h:443", "tok3n", "wss://<redacted>@h:443"),
        ("tok3n@h:4222", "tok3n", "<redacted>@h:4222"),
        (
            "nats://me:s%40cr%2Fet@h:4222",
            "s%40cr%2Fet",
            "nats://me:<redacted>@h:4222",
        ),
        (
            "nats://a:p1x@h1:4222,b:s3cret@h2:4222",
            "s3cret",
            "nats://a:<redacted>@h1:4222,b:<redacted>@h2:4222",
        ),
        (
            "postgres://u:s3cret@h:5432/db",
            "s3cret",
            "postgres://u:<redacted>@h:5432/db",
        ),
        (
            "postgresql://u:s3cret@h/db",
            "s3cret",
            "postgresql://u:<redacted>@h/db",
        ),
        (
            "postgres://u:pa/ss@h/db",
            "pa/ss",
            "postgres://u:<redacted>@h/db",
        ),
        (
            "postgres://u:pa?ss@h/db",
            "pa?ss",
            "postgres://u:<redacted>@h/db",
        ),
        (
            "postgres://u:pa#ss@h/db",
            "pa#ss",
            "postgres://u:<redacted>@h/db",
        ),
        (
            "postgres://u:p@ss@h/db",
            "p@ss",
            "postgres://u:<redacted>@h/db",
        ),
        (
            "postgres://u:pa,ss@h/db",
            "pa,ss",
            "postgres://u:<redacted>@h/db",
        ),
        (
            "postgres://u:s%2Fcret@h/db",
            "s%2Fcret",
            "postgres://u:<redacted>@h/db",
        ),
        (
            "postgres://u@h/db?password=s3cret",
            "s3cret",
            "postgres://u@h/db?password=<redacted>",
        ),
        (
            "postgres://h/db?user=u&PASSWORD=s3cret&sslmode=require",
            "s3cret",
            "postgres://h/db?user=u&PASSWORD=<redacted>&sslmode=require",
        ),
        (
            "postgres://u@h/db?sslpassword=s3cret",
            "s3cret",
            "postgres://u@h/db?sslpassword=<redacted>",
        ),
        (
            "nats://h:4222?token=s3cret",
            "s3cret",
            "nats://h:4222?token=<redacted>",
        ),
    ];

    #[test]
    fn every_form_is_redacted_and_stays_readable() {
        for (url, secret, shown) in FORMS {
            let redacted = redact_url(url);
            assert_eq!(&redacted, shown, "{url}");
            assert!(!redacted.contains(secret), "{url}: {redacted}");
            // An error that quotes the URL, or the secret alone, or it decoded.
            let decoded = percent_decode(secret);
            let text = format!("cannot reach {url}: password {secret} ({decoded}) refused");
            let cleaned = redact_text(&text, url);
            assert!(!cleaned.contains(secret), "{url}: {cleaned}");
            assert!(!cleaned.contains(&decoded), "{url}: {cleaned}");
        }
    }

    #[test]
    fn urls_without_secrets_are_left_alone() {
        for url in [
            "postgres://u@h/db",
            "postgres://h:5432/db?sslmode=require",
            "nats://h:4222",
            "h:4222",
            "nats://h1:4222,nats://h2:4222",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }

    #[test]
    fn credentials_come_out_of_nats_urls() {
        let (urls, credentials) = split_nats_credentials("nats://me:s%40cret@h1:4222,h2:4222");
        assert_eq!(urls, "nats://h1:4222,h2:4222");
        assert_eq!(
            credentials,
            Some(UrlCredentials::UserPassword {
                user: "me".into(),
                password: "s@cret".into()
            })
        );
        let (urls, credentials) = split_nats_credentials("tls://tok3n@h:4222");
        assert_eq!(urls, "tls://h:4222");
        assert_eq!(credentials, Some(UrlCredentials::Token("tok3n".into())));
        let (urls, credentials) = split_nats_credentials("nats://h:4222");
        assert_eq!(urls, "nats://h:4222");
        assert_eq!(credentials, None);
    }
}
