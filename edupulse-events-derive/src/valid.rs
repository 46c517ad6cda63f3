//! The rules for event names and subject templates, checked at compile time.
//!
//! A name is one or more dot-separated tokens of `[a-z0-9_-]`, at most
//! [`MAX_NAME_LEN`] characters. A subject template is made of the same literal tokens
//! and of `{field}` placeholders, each a whole token.

/// The longest event name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// One token of a parsed subject template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// A literal token, checked against the name rules.
    Literal(String),
    /// A `{field}` placeholder, filled from the field's `Display` at run time.
    Field(String),
}

/// Checks an event name; on failure, says what is wrong and what to write instead.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(
            "event name is empty; write a dot-separated name such as `lesson.published`".to_owned(),
        );
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "event name is {} characters long; the limit is {MAX_NAME_LEN}: shorten it",
            name.len()
        ));
    }
    if name.starts_with('$') {
        return Err(format!(
            "event name `{name}` starts with `$`, which NATS reserves for system subjects; \
             remove the `$`"
        ));
    }
    for token in name.split('.') {
        check_literal_token(name, token, "event name")?;
    }
    Ok(())
}

/// Checks one literal token of a name or subject.
fn check_literal_token(whole: &str, token: &str, what: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err(format!(
            "{what} `{whole}` has an empty token; write tokens separated by single dots, \
             with no leading or trailing dot, e.g. `lesson.published`"
        ));
    }
    if token.contains(['*', '>']) {
        return Err(format!(
            "{what} `{whole}` contains a wildcard (`*` or `>`); it must name one concrete \
             subject: remove the wildcard"
        ));
    }
    if let Some(bad) = token
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-'))
    {
        let lower = whole.to_ascii_lowercase();
        let hint = if bad.is_ascii_uppercase() && lower.split('.').all(is_valid_literal) {
            format!("; write it in lowercase: `{lower}`")
        } else {
            String::new()
        };
        return Err(format!(
            "{what} `{whole}` contains {}; tokens may use only lowercase ASCII letters, \
             digits, `_` and `-`{hint}",
            describe_char(bad)
        ));
    }
    Ok(())
}

fn is_valid_literal(token: &str) -> bool {
    !token.is_empty()
        && token
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn describe_char(c: char) -> String {
    if c.is_whitespace() {
        "whitespace".to_owned()
    } else if c.is_control() {
        "a control character".to_owned()
    } else {
        format!("`{c}`")
    }
}

/// Parses and checks a subject template such as `quiz.{quiz_id}.submitted`.
///
/// Field names are returned unchecked: whether the struct has them is the caller's
/// question.
pub fn parse_subject(subject: &str) -> Result<Vec<Segment>, String> {
    if subject.is_empty() {
        return Err(
            "subject is empty; leave `subject` out to use the event name, or write tokens \
             such as `quiz.{quiz_id}.submitted`"
                .to_owned(),
        );
    }
    if subject.len() > MAX_NAME_LEN {
        return Err(format!(
            "subject template is {} characters long; the limit is {MAX_NAME_LEN}: shorten it",
            subject.len()
        ));
    }
    let mut segments = Vec::new();
    for token in subject.split('.') {
        if let Some(inner) = token.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
            if inner.is_empty() {
                return Err(format!(
                    "subject `{subject}` has an empty placeholder `{{}}`; name a field, e.g. \
                     `{{quiz_id}}`"
                ));
            }
            if !is_ident(inner) {
                return Err(format!(
                    "subject `{subject}` has placeholder `{{{inner}}}`, which is not a field \
                     name; write the name of one of the struct's fields, e.g. `{{quiz_id}}`"
                ));
            }
            segments.push(Segment::Field(inner.to_owned()));
        } else if token.contains(['{', '}']) {
            return Err(format!(
                "subject `{subject}` has token `{token}`, which mixes a placeholder with other \
                 text; a placeholder must be a whole token between dots, e.g. \
                 `quiz.{{quiz_id}}.submitted`"
            ));
        } else {
            check_literal_token(subject, token, "subject")?;
            segments.push(Segment::Literal(token.to_owned()));
        }
    }
    Ok(segments)
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c == '_' || c.is_alphabetic() => {}
        _ => return false,
    }
    chars.all(|c| c == '_' || c.is_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_good_names() {
        for name in [
            "lesson.published",
            "quiz",
            "a.b.c.d",
            "quiz_v2.submitted-late",
            "0.1",
        ] {
            assert_eq!(check_name(name), Ok(()), "{name}");
        }
        assert_eq!(check_name(&"a".repeat(MAX_NAME_LEN)), Ok(()));
    }

    /// The derive's verdict on the shared table of names
    /// (`testdata/event_names.tsv`), which the runtime's check of hand-written impls
    /// reads too: the two rules cannot drift apart.
    #[test]
    fn names_follow_the_shared_table() {
        let table = include_str!("../../testdata/event_names.tsv");
        let mut seen = 0;
        for line in table
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (name, verdict) = line.split_once('\t').unwrap_or((line, ""));
            let name = match name.strip_prefix('<').and_then(|n| n.strip_suffix(" a>")) {
                Some(count) => "a".repeat(count.parse().unwrap_or(0)),
                None => name
                    .replace("\\s", " ")
                    .replace("\\t", "\t")
                    .replace("\\u{7}", "\u{7}"),
            };
            let found = match check_name(&name) {
                Ok(()) => "ok",
                Err(e) if e.contains("is empty") => "empty",
                Err(e) if e.contains("the limit is") => "too-long",
                Err(e) if e.contains("empty token") => "empty-token",
                Err(e) if e.contains("wildcard") => "wildcard",
                Err(e) if e.contains("starts with `$`") => "reserved",
                Err(e) if e.contains("tokens may use only") => "character",
                Err(e) => panic!("{name:?}: unclassified error {e}"),
            };
            assert_eq!(found, verdict, "{name:?}");
            seen += 1;
        }
        assert!(seen > 10);
    }

    #[test]
    fn rejects_bad_names_with_the_reason() {
        let cases = [
            ("", "is empty"),
            ("lesson..published", "empty token"),
            (".lesson", "empty token"),
            ("lesson.", "empty token"),
            ("lesson.*", "wildcard"),
            ("lesson.>", "wildcard"),
            ("$JS.api", "starts with `$`"),
            (
                "Lesson.Published",
                "write it in lowercase: `lesson.published`",
            ),
            ("lesson published", "whitespace"),
            ("lesson\tpublished", "whitespace"),
            ("lesson\u{7}", "control character"),
            ("lesson/published", "`/`"),
            (
                "Lesson Published",
                "contains `L`; tokens may use only lowercase ASCII letters, digits, `_` and `-`",
            ),
            ("leçon", "`ç`"),
        ];
        for (name, expected) in cases {
            let error = check_name(name).expect_err(name);
            assert!(error.contains(expected), "{name:?}: {error}");
        }
        // No lowercase hint where lowercasing would not make the name valid.
        assert!(!check_name("Lesson Published")
            .unwrap_err()
            .contains("write it in lowercase"));
        let long = "a".repeat(MAX_NAME_LEN + 1);
        assert!(check_name(&long).unwrap_err().contains("limit is 128"));
    }

    #[test]
    fn parses_subject_templates() {
        assert_eq!(
            parse_subject("quiz.{quiz_id}.submitted"),
            Ok(vec![
                Segment::Literal("quiz".into()),
                Segment::Field("quiz_id".into()),
                Segment::Literal("submitted".into()),
            ])
        );
        assert_eq!(
            parse_subject("{a}.{b}"),
            Ok(vec![Segment::Field("a".into()), Segment::Field("b".into())])
        );
    }

    #[test]
    fn rejects_bad_subjects() {
        let cases = [
            ("", "subject is empty"),
            ("quiz.id{quiz_id}", "must be a whole token"),
            ("quiz.{quiz_id", "must be a whole token"),
            ("quiz.{}.x", "empty placeholder"),
            ("quiz.{1x}", "not a field name"),
            ("quiz.{a-b}", "not a field name"),
            ("quiz..x", "empty token"),
            ("quiz.>", "wildcard"),
            ("Quiz.{id}", "lowercase"),
        ];
        for (subject, expected) in cases {
            let error = parse_subject(subject).expect_err(subject);
            assert!(error.contains(expected), "{subject:?}: {error}");
        }
    }
}
