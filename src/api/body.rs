//! Parsing of the create-command body, strict enough that no field is ever
//! dropped silently: duplicate and unknown properties are errors, property
//! names match case-insensitively, and `Payload` keeps its exact JSON text.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use chrono::DateTime;
use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::error::ApiError;
use crate::command::{Millis, NewCommand};
use crate::domain::postback_uri::PostBackUri;
use crate::domain::{CommandType, DeviceId};
use crate::net::address::AllowedNetworks;

/// Longest accepted text property, in bytes.
const MAX_TEXT_BYTES: usize = 1024;
/// Deepest accepted nesting of JSON arrays and objects in a body.
const MAX_DEPTH: usize = 64;

/// The properties a client may set, as the API page spells them.
const CLIENT_PROPERTIES: [&str; 8] = [
    "Type",
    "AppServiceName",
    "PackageFamilyName",
    "Payload",
    "PermissionTicket",
    "PostBackUri",
    "DeviceId",
    "ExpirationDateTime",
];

/// Properties the service owns. A client may send them (the API page's own
/// example does, and so does a client that posts back what it read), and
/// they are ignored.
const SERVER_PROPERTIES: [&str; 7] = [
    "id",
    "Status",
    "Error",
    "ResponsePayload",
    "CreatedDateTime",
    "LastActionDateTime",
    "Postback",
];

/// The request context that the create route passes besides the body.
pub struct CreateContext<'a> {
    pub path_device: Option<DeviceId>,
    pub owner: String,
    pub allowed_networks: &'a AllowedNetworks,
    pub default_ttl: Option<Duration>,
}

pub fn parse_create(body: &[u8], context: CreateContext<'_>) -> Result<NewCommand, ApiError> {
    let entries = parse_object(body)?;
    let mut seen = HashSet::new();
    let mut fields = Fields::default();
    for (name, value) in &entries {
        check_nested_duplicates(value, 1)?;
        if is_odata_annotation(name) {
            continue;
        }
        let canonical = canonical_name(name)?;
        if !seen.insert(canonical) {
            return Err(ApiError::bad_request(format!(
                "property {canonical} appears more than once (as {name:?} among others); send it once"
            )));
        }
        fields.set(canonical, value)?;
    }
    fields.into_command(context)
}

/// Property values by canonical name, still unvalidated.
#[derive(Default)]
struct Fields<'a> {
    command_type: Option<String>,
    app_service_name: Option<String>,
    package_family_name: Option<String>,
    payload: Option<&'a RawValue>,
    permission_ticket: Option<String>,
    postback_uri: Option<String>,
    device_id: Option<String>,
    expiration: Option<String>,
}

impl<'a> Fields<'a> {
    fn set(&mut self, name: &'static str, value: &'a RawValue) -> Result<(), ApiError> {
        match name {
            "Type" => self.command_type = optional_text(name, value)?,
            "AppServiceName" => self.app_service_name = optional_text(name, value)?,
            "PackageFamilyName" => self.package_family_name = optional_text(name, value)?,
            "PermissionTicket" => self.permission_ticket = optional_text(name, value)?,
            "PostBackUri" => self.postback_uri = optional_text(name, value)?,
            "DeviceId" => self.device_id = optional_text(name, value)?,
            "ExpirationDateTime" => self.expiration = optional_text(name, value)?,
            "Payload" => {
                self.payload = match value.get().trim_start().as_bytes().first() {
                    Some(b'n') => None,
                    Some(b'{') => Some(value),
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "property Payload must be a JSON object or null, got {}",
                            json_kind(value)
                        )));
                    }
                }
            }
            _ => {} // server-owned: ignored
        }
        Ok(())
    }

    fn into_command(self, context: CreateContext<'_>) -> Result<NewCommand, ApiError> {
        let device_id = resolve_device(context.path_device, self.device_id)?;
        let command_type: CommandType = self
            .command_type
            .ok_or_else(|| {
                ApiError::bad_request(
                    "property Type is missing; set it to \"AppService\" or \"LaunchUri\"",
                )
            })?
            .parse()
            .map_err(|message: String| ApiError::bad_request(format!("property {message}")))?;

        match command_type {
            CommandType::AppService => {
                if self
                    .app_service_name
                    .as_deref()
                    .is_none_or(|name| name.trim().is_empty())
                {
                    return Err(ApiError::bad_request(
                        "property AppServiceName is required when Type is AppService; name the app service to call",
                    ));
                }
            }
            CommandType::LaunchUri => check_launch_uri(self.payload)?,
        }

        let postback_uri = match self.postback_uri {
            None => None,
            Some(text) if text.trim().is_empty() => {
                return Err(ApiError::bad_request(
                    "property PostBackUri is empty; set it to an absolute http(s) URL, or leave it out or null for no postback",
                ));
            }
            Some(text) if text.trim().eq_ignore_ascii_case("null") => {
                return Err(ApiError::bad_request(
                    "property PostBackUri is the string \"null\"; send JSON null or leave it out for no postback",
                ));
            }
            Some(text) => Some(
                PostBackUri::parse(&text, context.allowed_networks)
                    .map_err(ApiError::bad_request)?
                    .as_str()
                    .to_owned(),
            ),
        };

        let now = Millis::now();
        let expires_at = match self.expiration {
            Some(text) => Some(parse_expiration(&text, now)?),
            None => context.default_ttl.map(|ttl| now.saturating_add(ttl)),
        };

        Ok(NewCommand {
            device_id,
            owner: context.owner,
            command_type,
            app_service_name: self.app_service_name,
            package_family_name: self.package_family_name,
            payload: self.payload.map(|raw| raw.get().to_owned()),
            permission_ticket: self.permission_ticket,
            postback_uri,
            expires_at,
        })
    }
}

fn resolve_device(path: Option<DeviceId>, body: Option<String>) -> Result<DeviceId, ApiError> {
    let from_body = body
        .map(|text| {
            DeviceId::parse(&text).map_err(|error| {
                ApiError::bad_request(format!("property DeviceId is invalid: {error}"))
            })
        })
        .transpose()?;
    match (path, from_body) {
        (Some(path), Some(body)) if path != body => Err(ApiError::bad_request(format!(
            "property DeviceId {:?} differs from the device {:?} in the URL; omit it or make them equal",
            body.as_str(),
            path.as_str()
        ))),
        (Some(path), _) => Ok(path),
        (None, Some(body)) => Ok(body),
        (None, None) => Err(ApiError::bad_request(
            "property DeviceId is required on POST /commands; name the target device, or POST to /devices/{deviceId}/commands",
        )),
    }
}

fn check_launch_uri(payload: Option<&RawValue>) -> Result<(), ApiError> {
    #[derive(Deserialize)]
    struct LaunchPayload {
        uri: Option<serde_json::Value>,
    }
    let missing = || {
        ApiError::bad_request(
            "property Payload.uri is required when Type is LaunchUri; set it to the absolute URI to open",
        )
    };
    let payload = payload.ok_or_else(missing)?;
    let parsed: LaunchPayload = serde_json::from_str(payload.get()).map_err(|_| missing())?;
    let uri = match parsed.uri {
        Some(serde_json::Value::String(uri)) => uri,
        Some(_) => {
            return Err(ApiError::bad_request(
                "property Payload.uri must be a string",
            ));
        }
        None => return Err(missing()),
    };
    url::Url::parse(&uri).map(|_| ()).map_err(|error| {
        ApiError::bad_request(format!(
            "property Payload.uri {uri:?} is not an absolute URI: {error}"
        ))
    })
}

fn parse_expiration(text: &str, now: Millis) -> Result<Millis, ApiError> {
    let at = DateTime::parse_from_rfc3339(text).map_err(|error| {
        ApiError::bad_request(format!(
            "property ExpirationDateTime {text:?} is not an ISO 8601 date and time with offset, such as 2030-01-31T12:00:00Z: {error}"
        ))
    })?;
    let at = Millis(at.timestamp_millis());
    if at <= now {
        return Err(ApiError::bad_request(format!(
            "property ExpirationDateTime {text:?} is in the past; use a later time or leave it out"
        )));
    }
    Ok(at)
}

/// Returns true for the two OData annotation forms, which the parser skips
/// because they describe the body. They are an instance annotation
/// `@namespace.term`, such as `@odata.type`, and a property annotation
/// `Property@namespace.term` on a command property, such as
/// `Payload@odata.type`. A term may end in `#qualifier`. Any other key with
/// `@` is an unknown property.
fn is_odata_annotation(key: &str) -> bool {
    let Some((property, term)) = key.split_once('@') else {
        return false;
    };
    let annotates_the_body = property.is_empty() || known_property(property).is_some();
    annotates_the_body && is_qualified_term(term)
}

/// Checks a namespace-qualified term name, such as `odata.type` or
/// `Core.Description#short`. That is two or more identifiers joined by dots,
/// optionally followed by `#` and a qualifier identifier.
fn is_qualified_term(text: &str) -> bool {
    let (name, qualifier) = match text.split_once('#') {
        Some((name, qualifier)) => (name, Some(qualifier)),
        None => (text, None),
    };
    let segments: Vec<&str> = name.split('.').collect();
    segments.len() >= 2
        && segments.iter().all(|segment| is_identifier(segment))
        && qualifier.is_none_or(is_identifier)
}

/// Checks an identifier: a letter or `_`, then letters, digits or `_`.
fn is_identifier(text: &str) -> bool {
    let mut characters = text.chars();
    let valid_first = characters
        .next()
        .is_some_and(|first| first.is_alphabetic() || first == '_');
    valid_first && characters.all(|character| character.is_alphanumeric() || character == '_')
}

/// Returns the canonical spelling of a command property named in any letter
/// case, or `None` when the command has no such property.
fn known_property(name: &str) -> Option<&'static str> {
    CLIENT_PROPERTIES
        .iter()
        .chain(SERVER_PROPERTIES.iter())
        .find(|known| known.eq_ignore_ascii_case(name))
        .copied()
}

/// Maps a property name, in any letter case, to its canonical spelling.
fn canonical_name(name: &str) -> Result<&'static str, ApiError> {
    known_property(name).ok_or_else(|| {
        let hint = closest_property(name)
            .map(|known| format!("; did you mean {known}"))
            .unwrap_or_default();
        ApiError::bad_request(format!(
            "property {name:?} is not a command property{hint}. Settable properties are {}",
            CLIENT_PROPERTIES.join(", ")
        ))
    })
}

/// Returns the client property nearest to a misspelled name, if one is close.
fn closest_property(name: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    CLIENT_PROPERTIES
        .iter()
        .map(|known| (edit_distance(&lower, &known.to_ascii_lowercase()), *known))
        .filter(|(distance, _)| *distance <= 3)
        .min()
        .map(|(_, known)| known)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

fn optional_text(name: &str, value: &RawValue) -> Result<Option<String>, ApiError> {
    let text: Option<String> = serde_json::from_str(value.get()).map_err(|_| {
        ApiError::bad_request(format!(
            "property {name} must be a string or null, got {}",
            json_kind(value)
        ))
    })?;
    if let Some(text) = &text {
        if text.len() > MAX_TEXT_BYTES {
            return Err(ApiError::bad_request(format!(
                "property {name} is {} bytes long; the maximum is {MAX_TEXT_BYTES}",
                text.len()
            )));
        }
        if text.chars().any(char::is_control) {
            return Err(ApiError::bad_request(format!(
                "property {name} contains control characters; remove them"
            )));
        }
    }
    Ok(text)
}

fn json_kind(value: &RawValue) -> &'static str {
    match value.get().trim_start().as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// Reads a JSON object into its entries in order, keeping duplicates so that
/// they can be reported instead of silently resolved.
fn parse_object(body: &[u8]) -> Result<Vec<(String, &RawValue)>, ApiError> {
    let text = std::str::from_utf8(body).map_err(|error| {
        ApiError::bad_request(format!("request body is not valid UTF-8: {error}"))
    })?;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let entries = Entries::deserialize(&mut deserializer).map_err(|error| {
        if error.classify() == serde_json::error::Category::Data {
            ApiError::bad_request("request body must be a JSON object")
        } else {
            ApiError::bad_request(format!("request body is not valid JSON: {error}"))
        }
    })?;
    deserializer.end().map_err(|error| {
        ApiError::bad_request(format!(
            "request body has data after the JSON object: {error}"
        ))
    })?;
    Ok(entries.0)
}

struct Entries<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Entries<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, &'de RawValue>()? {
                    entries.push((key, value));
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

struct Items<'a>(Vec<&'a RawValue>);

impl<'de> Deserialize<'de> for Items<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ItemsVisitor;
        impl<'de> Visitor<'de> for ItemsVisitor {
            type Value = Items<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<&'de RawValue>()? {
                    items.push(item);
                }
                Ok(Items(items))
            }
        }
        deserializer.deserialize_seq(ItemsVisitor)
    }
}

/// Rejects a key that appears twice in any object nested in `value`.
fn check_nested_duplicates(value: &RawValue, depth: usize) -> Result<(), ApiError> {
    if depth > MAX_DEPTH {
        return Err(ApiError::bad_request(format!(
            "request body nests deeper than {MAX_DEPTH} levels"
        )));
    }
    match value.get().trim_start().as_bytes().first() {
        Some(b'{') => {
            let entries: Entries = serde_json::from_str(value.get()).map_err(invalid_nested)?;
            let mut keys = HashSet::new();
            for (key, nested) in &entries.0 {
                if !keys.insert(key.as_str()) {
                    return Err(ApiError::bad_request(format!(
                        "key {key:?} appears more than once in one object of the body; send it once"
                    )));
                }
                check_nested_duplicates(nested, depth + 1)?;
            }
            Ok(())
        }
        Some(b'[') => {
            let items: Items = serde_json::from_str(value.get()).map_err(invalid_nested)?;
            items
                .0
                .iter()
                .try_for_each(|item| check_nested_duplicates(item, depth + 1))
        }
        _ => Ok(()),
    }
}

fn invalid_nested(error: serde_json::Error) -> ApiError {
    ApiError::bad_request(format!("request body is not valid JSON: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> CreateContext<'static> {
        static ALLOWED: std::sync::OnceLock<AllowedNetworks> = std::sync::OnceLock::new();
        CreateContext {
            path_device: Some(DeviceId::parse("kiosk-1").unwrap()),
            owner: "alice".into(),
            allowed_networks: ALLOWED.get_or_init(AllowedNetworks::default),
            default_ttl: None,
        }
    }

    fn parse(body: &str) -> Result<NewCommand, ApiError> {
        parse_create(body.as_bytes(), context())
    }

    fn message(body: &str) -> String {
        parse(body).unwrap_err().message
    }

    #[test]
    fn accepts_the_api_page_example_with_a_real_type() {
        let body = r##"{
          "@odata.type": "#microsoft.graph.command",
          "Status": "Status value", "Type": "AppService", "AppServiceName": "echo",
          "PackageFamilyName": "Package Family Name value", "Error": "Error value",
          "Payload": {"@odata.type": "microsoft.graph.PayloadRequest"},
          "PermissionTicket": "Permission Ticket value"
        }"##;
        let command = parse(body).unwrap();
        assert_eq!(command.app_service_name.as_deref(), Some("echo"));
        assert_eq!(
            command.payload.as_deref(),
            Some(r#"{"@odata.type": "microsoft.graph.PayloadRequest"}"#)
        );
    }

    #[test]
    fn odata_annotations_are_ignored() {
        let keys = [
            "@odata.type",
            "@odata.context",
            "@Org.Example.note#internal",
            "Payload@odata.type",
            "payload@odata.type",
            "Status@odata.type",
            "PostBackUri@Core.Description",
        ];
        for key in keys {
            let body = format!(r#"{{"Type":"AppService","AppServiceName":"echo","{key}":"x"}}"#);
            assert!(parse(&body).is_ok(), "{key}: {:?}", parse(&body).err());
        }
    }

    #[test]
    fn other_keys_with_at_sign_are_rejected() {
        let keys = [
            "user@example.com",
            "PostBackUrl@odata.type",
            "Payload@",
            "Payload@odata",
            "Payload@odata.",
            "Payload@.type",
            "@",
            "@odata",
            "@odata.type@odata.type",
            "@odata.type#",
            "@1odata.type",
            "Payload@@odata.type",
        ];
        for key in keys {
            let body = format!(r#"{{"Type":"AppService","AppServiceName":"echo","{key}":"x"}}"#);
            let text = message(&body);
            assert!(text.contains(&format!("{key:?}")), "{key}: {text}");
            assert!(text.contains("is not a command property"), "{key}: {text}");
        }
    }

    #[test]
    fn property_names_match_in_any_case() {
        let command =
            parse(r#"{"type": "appService", "appServiceName": "echo", "payload": {"a": 1}}"#)
                .unwrap();
        assert_eq!(command.command_type, CommandType::AppService);
        assert_eq!(command.payload.as_deref(), Some(r#"{"a": 1}"#));
    }

    #[test]
    fn payload_text_is_kept_exactly() {
        let body = r#"{"Type":"AppService","AppServiceName":"echo","Payload":{"n":1.000000000000000000001,"s":"\u00e9✓"}}"#;
        let command = parse(body).unwrap();
        assert_eq!(
            command.payload.as_deref(),
            Some(r#"{"n":1.000000000000000000001,"s":"\u00e9✓"}"#)
        );
    }

    #[test]
    fn duplicate_property_in_two_casings_is_rejected() {
        let text = message(r#"{"Type":"AppService","type":"LaunchUri","AppServiceName":"echo"}"#);
        assert!(text.contains("Type"), "{text}");
    }

    #[test]
    fn duplicate_key_inside_payload_is_rejected() {
        let text =
            message(r#"{"Type":"AppService","AppServiceName":"echo","Payload":{"a":1,"a":2}}"#);
        assert!(text.contains("\"a\""), "{text}");
    }

    #[test]
    fn misspelled_property_is_named_with_a_suggestion() {
        let text = message(
            r#"{"Type":"AppService","AppServiceName":"echo","PostBackUrl":"https://example.com/"}"#,
        );
        assert!(text.contains("PostBackUrl"), "{text}");
        assert!(text.contains("did you mean PostBackUri"), "{text}");
    }

    #[test]
    fn wrong_types_name_the_property() {
        assert!(message(r#"{"Type":1}"#).contains("property Type must be a string"));
        assert!(
            message(r#"{"Type":"AppService","AppServiceName":"echo","Payload":5}"#)
                .contains("Payload must be a JSON object")
        );
    }

    #[test]
    fn type_is_required_and_checked() {
        assert!(message(r#"{"AppServiceName":"echo"}"#).contains("Type is missing"));
        assert!(message(r#"{"Type":"Type value"}"#).contains("AppService"));
    }

    #[test]
    fn app_service_needs_a_name() {
        assert!(message(r#"{"Type":"AppService"}"#).contains("AppServiceName is required"));
    }

    #[test]
    fn launch_uri_needs_payload_uri() {
        assert!(message(r#"{"Type":"LaunchUri"}"#).contains("Payload.uri is required"));
        assert!(
            message(r#"{"Type":"LaunchUri","Payload":{"uri":"not a uri"}}"#)
                .contains("not an absolute URI")
        );
        assert!(parse(r#"{"Type":"LaunchUri","Payload":{"uri":"https://example.com/"}}"#).is_ok());
    }

    #[test]
    fn non_object_bodies_are_rejected() {
        assert!(message("[1,2]").contains("must be a JSON object"));
        assert!(message("{").contains("not valid JSON"));
        assert!(message(r#"{"Type":"AppService"} x"#).contains("after the JSON object"));
    }

    #[test]
    fn device_in_body_must_match_the_path() {
        assert!(
            message(r#"{"Type":"AppService","AppServiceName":"echo","DeviceId":"other"}"#)
                .contains("differs")
        );
    }

    #[test]
    fn expiration_must_be_future_iso8601() {
        assert!(
            message(
                r#"{"Type":"AppService","AppServiceName":"echo","ExpirationDateTime":"tomorrow"}"#
            )
            .contains("ISO 8601")
        );
        assert!(message(r#"{"Type":"AppService","AppServiceName":"echo","ExpirationDateTime":"2001-01-01T00:00:00Z"}"#).contains("in the past"));
    }

    #[test]
    fn deep_nesting_is_rejected() {
        let body = format!(
            r#"{{"Type":"AppService","AppServiceName":"echo","Payload":{}{}}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        assert!(message(&body).contains("nests deeper"));
    }
}
