use std::fmt;

/// Longest device id in bytes. AMQP queue names are short strings of at most
/// 255 bytes, and the queue name adds a configurable prefix, so the id keeps
/// half of that and the prefix gets the rest (see `Topology::new`).
pub const MAX_DEVICE_ID_BYTES: usize = 128;

/// A device id: 1 to 128 bytes of ASCII letters, digits and `-._:@~`.
///
/// The set leaves out `/` and `%` so that an id is the same in a URL path
/// segment, an AMQP routing key and a queue name, without escaping.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidDeviceId {
    #[error("device id is empty")]
    Empty,
    #[error("device id is {0} bytes long, the maximum is {MAX_DEVICE_ID_BYTES}")]
    TooLong(usize),
    #[error(
        "device id contains the character {0:?}; allowed are ASCII letters, digits and - . _ : @ ~"
    )]
    InvalidCharacter(char),
}

impl DeviceId {
    pub fn parse(value: &str) -> Result<Self, InvalidDeviceId> {
        if value.is_empty() {
            return Err(InvalidDeviceId::Empty);
        }
        if let Some(invalid) = value.chars().find(|c| !is_allowed(*c)) {
            return Err(InvalidDeviceId::InvalidCharacter(invalid));
        }
        if value.len() > MAX_DEVICE_ID_BYTES {
            return Err(InvalidDeviceId::TooLong(value.len()));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':' | '@' | '~')
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_guid_and_hostname_forms() {
        assert!(DeviceId::parse("b0b6c364-c364-b0b6-64c3-b6b064c3b6b0").is_ok());
        assert!(DeviceId::parse("kiosk-7.lobby:eu@site~2").is_ok());
    }

    #[test]
    fn rejects_empty_id() {
        assert_eq!(DeviceId::parse(""), Err(InvalidDeviceId::Empty));
    }

    #[test]
    fn rejects_separators_and_controls() {
        for (input, bad) in [
            ("a/b", '/'),
            ("a%2Fb", '%'),
            ("a\0b", '\0'),
            ("a b", ' '),
            ("é", 'é'),
        ] {
            assert_eq!(
                DeviceId::parse(input),
                Err(InvalidDeviceId::InvalidCharacter(bad)),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn rejects_ids_over_the_byte_limit() {
        let at_limit = "d".repeat(MAX_DEVICE_ID_BYTES);
        assert!(DeviceId::parse(&at_limit).is_ok());
        let over = "d".repeat(MAX_DEVICE_ID_BYTES + 1);
        assert_eq!(
            DeviceId::parse(&over),
            Err(InvalidDeviceId::TooLong(MAX_DEVICE_ID_BYTES + 1))
        );
    }
}
