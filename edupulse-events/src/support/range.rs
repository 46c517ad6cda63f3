//! The ranges settings must keep: durations that cannot spin a core (zero where a
//! pause is meant) or overflow a deadline (`Instant + Duration` panics).

use std::time::Duration;

/// The longest duration any setting takes: a year. Longer ones mean nothing in
/// practice, and near `Duration::MAX` they overflow the deadlines computed from them.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Checks a duration setting: at most [`MAX_DURATION`], and more than zero unless
/// `zero_means` says what zero does.
pub(crate) fn check_duration(
    name: &str,
    value: Duration,
    zero_means: Option<&str>,
) -> Result<(), String> {
    if value > MAX_DURATION {
        return Err(format!(
            "{name} is {value:?}, longer than the one year any setting may take; use a \
             shorter duration"
        ));
    }
    if value.is_zero() && zero_means.is_none() {
        return Err(format!(
            "{name} is zero, which would make a loop spin without pausing; use a positive \
             duration"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_and_huge_durations_are_refused_with_the_setting_named() {
        assert_eq!(check_duration("x", Duration::from_secs(1), None), Ok(()));
        assert_eq!(check_duration("x", MAX_DURATION, None), Ok(()));
        assert_eq!(check_duration("x", Duration::ZERO, Some("never")), Ok(()));
        let zero = check_duration("retry_base", Duration::ZERO, None).unwrap_err();
        assert!(zero.contains("retry_base is zero"), "{zero}");
        let huge = check_duration("ack_wait", Duration::MAX, Some("never")).unwrap_err();
        assert!(huge.contains("ack_wait"), "{huge}");
        // The deadline a checked setting makes never overflows.
        assert!(std::time::Instant::now()
            .checked_add(MAX_DURATION * 2)
            .is_some());
    }
}
