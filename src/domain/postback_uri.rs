// Temporary stand-in until the validated version lands.
use crate::net::address::AllowedNetworks;

pub struct PostBackUri(url::Url);

impl PostBackUri {
    pub fn parse(value: &str, _allowed: &AllowedNetworks) -> Result<Self, String> {
        url::Url::parse(value)
            .map(Self)
            .map_err(|error| format!("PostBackUri is invalid: {error}"))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}
