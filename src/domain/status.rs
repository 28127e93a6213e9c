use std::fmt;
use std::str::FromStr;

/// Where a command is in its life, with Graph's names where Graph has one.
///
/// A status only moves forward: `queued` → `sentToTarget` → `executing` →
/// one final status. [`CommandStatus::can_move_to`] is the one place that
/// decides which transitions are allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CommandStatus {
    Queued,
    SentToTarget,
    Executing,
    Completed,
    ExecutionFailed,
    FailedToSend,
    Expired,
    Canceled,
}

impl CommandStatus {
    pub const ALL: [Self; 8] = [
        Self::Queued,
        Self::SentToTarget,
        Self::Executing,
        Self::Completed,
        Self::ExecutionFailed,
        Self::FailedToSend,
        Self::Expired,
        Self::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::SentToTarget => "sentToTarget",
            Self::Executing => "executing",
            Self::Completed => "completed",
            Self::ExecutionFailed => "executionFailed",
            Self::FailedToSend => "failedToSend",
            Self::Expired => "expired",
            Self::Canceled => "canceled",
        }
    }

    pub fn is_final(self) -> bool {
        self.stage() == 3
    }

    /// Position along the path; every final status shares the last stage.
    fn stage(self) -> u8 {
        match self {
            Self::Queued => 0,
            Self::SentToTarget => 1,
            Self::Executing => 2,
            _ => 3,
        }
    }

    /// Whether a command in `self` may move to `next`.
    ///
    /// Forward moves only, and a final status never changes. A device may
    /// skip stages (a report of `completed` can arrive before `executing`
    /// when reports are redelivered out of order), but some final statuses
    /// only make sense from some stages: `failedToSend` means the message
    /// never reached the device, and `expired` means it never ran.
    pub fn can_move_to(self, next: Self) -> bool {
        if self.is_final() || next.stage() <= self.stage() {
            return false;
        }
        match next {
            Self::FailedToSend => self == Self::Queued,
            Self::Expired => self.stage() < Self::Executing.stage(),
            _ => true,
        }
    }
}

impl fmt::Display for CommandStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses a status case-insensitively, so a device that reports `Completed`
/// or `completed` means the same.
impl FromStr for CommandStatus {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str().eq_ignore_ascii_case(value))
            .ok_or_else(|| format!("unknown command status {value:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::CommandStatus::*;
    use super::*;

    #[test]
    fn moves_forward_along_the_path() {
        assert!(Queued.can_move_to(SentToTarget));
        assert!(SentToTarget.can_move_to(Executing));
        assert!(Executing.can_move_to(Completed));
        assert!(Executing.can_move_to(ExecutionFailed));
        assert!(Queued.can_move_to(Completed), "stages may be skipped");
    }

    #[test]
    fn never_moves_backwards_or_sideways() {
        assert!(!Executing.can_move_to(SentToTarget));
        assert!(!Executing.can_move_to(Executing));
        assert!(!SentToTarget.can_move_to(Queued));
    }

    #[test]
    fn final_statuses_never_change() {
        for from in CommandStatus::ALL.into_iter().filter(|s| s.is_final()) {
            for to in CommandStatus::ALL {
                assert!(!from.can_move_to(to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn failed_to_send_only_from_queued() {
        assert!(Queued.can_move_to(FailedToSend));
        assert!(!SentToTarget.can_move_to(FailedToSend));
    }

    #[test]
    fn expired_only_before_execution() {
        assert!(Queued.can_move_to(Expired));
        assert!(SentToTarget.can_move_to(Expired));
        assert!(!Executing.can_move_to(Expired));
    }

    #[test]
    fn parses_every_status_by_name() {
        for status in CommandStatus::ALL {
            assert_eq!(status.as_str().parse(), Ok(status));
        }
        assert_eq!("COMPLETED".parse(), Ok(Completed));
        assert!("done".parse::<CommandStatus>().is_err());
    }
}
