//! The run-time rules of subjects: a subject token (a placeholder's value, a token of
//! the prefix or of a whole subject) and an event name. The derive checks the same
//! name rule at compile time; both are tested against `testdata/event_names.tsv`.

/// The longest value a placeholder may take, in bytes.
pub const MAX_TOKEN_LEN: usize = 256;

/// The longest event name, in bytes (as the derive allows).
pub(crate) const MAX_NAME_LEN: usize = 128;

/// Why a value is not a valid subject token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenProblem {
    /// The value is empty.
    #[error("it is empty")]
    Empty,
    /// The value contains `.`, which separates tokens.
    #[error("it contains `.`, which separates subject tokens")]
    Dot,
    /// The value contains a wildcard, `*` or `>`.
    #[error("it contains a wildcard (`*` or `>`)")]
    Wildcard,
    /// The value contains whitespace.
    #[error("it contains whitespace")]
    Whitespace,
    /// The value contains a control character.
    #[error("it contains a control character")]
    Control,
    /// The value is longer than [`MAX_TOKEN_LEN`].
    #[error("it is longer than 256 bytes")]
    TooLong,
}

/// Checks that `token` can stand as one subject token: the one run-time check, used
/// for placeholder values, the subject prefix and whole subjects.
///
/// # Errors
/// The first problem found.
pub fn check_token(token: &str) -> Result<(), TokenProblem> {
    if token.is_empty() {
        return Err(TokenProblem::Empty);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenProblem::TooLong);
    }
    for c in token.chars() {
        match c {
            '.' => return Err(TokenProblem::Dot),
            '*' | '>' => return Err(TokenProblem::Wildcard),
            c if c.is_whitespace() => return Err(TokenProblem::Whitespace),
            c if c.is_control() => return Err(TokenProblem::Control),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a dot-separated subject (or prefix): every token passes [`check_token`].
/// Returns the first bad token and its problem.
pub(crate) fn check_subject(subject: &str) -> Result<(), (String, TokenProblem)> {
    for token in subject.split('.') {
        check_token(token).map_err(|problem| (token.chars().take(64).collect(), problem))?;
    }
    Ok(())
}

/// Why a string is not a valid event name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NameProblem {
    Empty,
    TooLong,
    EmptyToken,
    Wildcard,
    /// Starts with `$`, which NATS reserves.
    Reserved,
    /// A character other than lowercase ASCII letters, digits, `_` and `-`.
    Character(char),
}

impl std::fmt::Display for NameProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NameProblem::Empty => f.write_str("it is empty"),
            NameProblem::TooLong => write!(f, "it is longer than {MAX_NAME_LEN} bytes"),
            NameProblem::EmptyToken => f.write_str("it has an empty token"),
            NameProblem::Wildcard => f.write_str("it contains a wildcard (`*` or `>`)"),
            NameProblem::Reserved => f.write_str("it starts with `$`, which NATS reserves"),
            NameProblem::Character(c) => write!(
                f,
                "it contains {c:?}; names use lowercase ASCII letters, digits, `_` and `-`"
            ),
        }
    }
}

/// Checks an event name by the derive's rule (for hand-written `DomainEvent` impls):
/// dot-separated tokens of `[a-z0-9_-]`, at most 128 bytes, no leading `$`.
pub(crate) fn check_name(name: &str) -> Result<(), NameProblem> {
    if name.is_empty() {
        return Err(NameProblem::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameProblem::TooLong);
    }
    if name.starts_with('$') {
        return Err(NameProblem::Reserved);
    }
    for token in name.split('.') {
        if token.is_empty() {
            return Err(NameProblem::EmptyToken);
        }
        if token.contains(['*', '>']) {
            return Err(NameProblem::Wildcard);
        }
        if let Some(c) = token
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-'))
        {
            return Err(NameProblem::Character(c));
        }
    }
    Ok(())
}

/// The shared table of event names (`testdata/event_names.tsv`), decoded: (name,
/// verdict). The derive's tests decode the same file the same way.
#[cfg(test)]
pub(crate) fn name_cases() -> Vec<(String, String)> {
    include_str!("../../testdata/event_names.tsv")
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (name, verdict) = line.split_once('\t').unwrap_or((line, ""));
            let name = match name.strip_prefix('<').and_then(|n| n.strip_suffix(" a>")) {
                Some(count) => "a".repeat(count.parse().unwrap_or(0)),
                None => name
                    .replace("\\s", " ")
                    .replace("\\t", "\t")
                    .replace("\\u{7}", "\u{7}"),
            };
            (name, verdict.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_shared_table() {
        let cases = name_cases();
        assert!(cases.len() > 10);
        for (name, verdict) in cases {
            let found = match check_name(&name) {
                Ok(()) => "ok",
                Err(NameProblem::Empty) => "empty",
                Err(NameProblem::TooLong) => "too-long",
                Err(NameProblem::EmptyToken) => "empty-token",
                Err(NameProblem::Wildcard) => "wildcard",
                Err(NameProblem::Reserved) => "reserved",
                Err(NameProblem::Character(_)) => "character",
            };
            assert_eq!(found, verdict, "{name:?}");
        }
    }

    #[test]
    fn tokens_accept_ordinary_values() {
        for token in ["3f2c9a", "42", "Alice", "a-b_c", "ünïcode", "~!@#%^&()"] {
            assert_eq!(check_token(token), Ok(()), "{token}");
        }
    }

    #[test]
    fn tokens_reject_hostile_values() {
        let cases = [
            ("", TokenProblem::Empty),
            ("a.b", TokenProblem::Dot),
            (".", TokenProblem::Dot),
            ("*", TokenProblem::Wildcard),
            ("a>", TokenProblem::Wildcard),
            (">", TokenProblem::Wildcard),
            ("a b", TokenProblem::Whitespace),
            ("a\tb", TokenProblem::Whitespace),
            ("a\r\nPUB x 1", TokenProblem::Whitespace),
            ("a\u{0}", TokenProblem::Control),
            ("a\u{7f}", TokenProblem::Control),
            ("\u{2028}", TokenProblem::Whitespace),
            ("\u{a0}", TokenProblem::Whitespace),
        ];
        for (token, expected) in cases {
            assert_eq!(check_token(token), Err(expected), "{token:?}");
        }
        assert_eq!(check_token(&"x".repeat(MAX_TOKEN_LEN)), Ok(()));
        assert_eq!(
            check_token(&"x".repeat(MAX_TOKEN_LEN + 1)),
            Err(TokenProblem::TooLong)
        );
    }

    #[test]
    fn whole_subjects_are_checked_token_by_token() {
        assert_eq!(check_subject("quiz.42.submitted"), Ok(()));
        for (subject, problem) in [
            ("", TokenProblem::Empty),
            ("a..b", TokenProblem::Empty),
            ("a.>", TokenProblem::Wildcard),
            ("a.bad subject", TokenProblem::Whitespace),
            ("a.", TokenProblem::Empty),
        ] {
            assert_eq!(
                check_subject(subject).map_err(|e| e.1),
                Err(problem),
                "{subject:?}"
            );
        }
    }
}
