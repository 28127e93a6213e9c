use std::fmt;
use std::str::FromStr;

/// What a command asks the device to do, as Graph's `Type` property names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CommandType {
    /// Call an app service on the device; `AppServiceName` says which.
    AppService,
    /// Open the URI in `Payload.uri` on the device.
    LaunchUri,
}

impl CommandType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AppService => "AppService",
            Self::LaunchUri => "LaunchUri",
        }
    }
}

impl fmt::Display for CommandType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses a type case-insensitively, because Graph's own pages spell it both
/// `appService` and `AppService`.
impl FromStr for CommandType {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value.eq_ignore_ascii_case("AppService") {
            Ok(Self::AppService)
        } else if value.eq_ignore_ascii_case("LaunchUri") {
            Ok(Self::LaunchUri)
        } else {
            Err(format!(
                "Type {value:?} is not supported; use \"AppService\" or \"LaunchUri\""
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_graph_spellings() {
        assert_eq!("appService".parse(), Ok(CommandType::AppService));
        assert_eq!("AppService".parse(), Ok(CommandType::AppService));
        assert_eq!("launchuri".parse(), Ok(CommandType::LaunchUri));
    }

    #[test]
    fn rejects_other_values() {
        let error = "Type value".parse::<CommandType>().unwrap_err();
        assert!(error.contains("AppService"), "{error}");
    }
}
