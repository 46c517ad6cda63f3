//! The fault-injection suite (filled by the fault-injection issue).
