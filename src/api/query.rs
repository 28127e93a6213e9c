//! OData query options of command listings (`$top`, `$filter`,
//! `$skiptoken`) and the page token inside `@odata.nextLink`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use uuid::Uuid;

use super::error::ApiError;
use super::filter::{self, Filter};
use crate::command::Millis;
use crate::store::Cursor;

/// Page size when a listing names no `$top`.
pub const DEFAULT_TOP: u32 = 100;
/// Largest accepted `$top`.
pub const MAX_TOP: u32 = 1000;

const SUPPORTED_OPTIONS: &str = "$top, $filter and $skiptoken";

/// Options that OData defines and listings do not support, with the reason.
const UNSUPPORTED_OPTIONS: [(&str, &str); 10] = [
    (
        "$orderby",
        "results are always ordered by CreatedDateTime, newest first",
    ),
    (
        "$skip",
        "page with the @odata.nextLink of each page instead",
    ),
    ("$select", "every command property is always returned"),
    ("$expand", "commands have no navigation properties"),
    ("$count", "page through the results to count them"),
    ("$search", "use $filter on Status or CreatedDateTime"),
    ("$format", "responses are always JSON"),
    ("$compute", "computed properties are not supported"),
    ("$apply", "aggregation is not supported"),
    ("$deltatoken", "change tracking is not supported"),
];

/// The parsed query options of one listing request.
#[derive(Clone, Debug)]
pub struct ListOptions {
    pub top: u32,
    pub filter: Filter,
    /// The `$filter` text as sent, carried into `@odata.nextLink`.
    pub filter_text: Option<String>,
    /// Position after which the page starts, from `$skiptoken`.
    pub after: Option<Cursor>,
}

/// Parses the raw query string of a listing request.
pub fn parse_list_options(query: Option<&str>) -> Result<ListOptions, ApiError> {
    let mut top = None;
    let mut filter_text = None;
    let mut skip_token = None;
    for (name, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let slot = match name.to_ascii_lowercase().as_str() {
            "$top" => &mut top,
            "$filter" => &mut filter_text,
            "$skiptoken" => &mut skip_token,
            _ => return Err(unsupported_option(&name)),
        };
        if slot.is_some() {
            return Err(ApiError::bad_request(format!(
                "query option {name} appears more than once; send it once"
            )));
        }
        *slot = Some(value.into_owned());
    }

    let top = top
        .as_deref()
        .map(parse_top)
        .transpose()?
        .unwrap_or(DEFAULT_TOP);
    let filter = match filter_text.as_deref() {
        Some(text) => filter::parse(text).map_err(ApiError::bad_request)?,
        None => Filter::default(),
    };
    let after = skip_token
        .as_deref()
        .map(|token| {
            decode_page_token(token).map_err(|reason| {
                ApiError::bad_request(format!(
                    "$skiptoken is invalid ({reason}); use the @odata.nextLink of the previous page as returned"
                ))
            })
        })
        .transpose()?;
    Ok(ListOptions {
        top,
        filter,
        filter_text,
        after,
    })
}

fn unsupported_option(name: &str) -> ApiError {
    let lower = name.to_ascii_lowercase();
    if let Some((option, reason)) = UNSUPPORTED_OPTIONS
        .iter()
        .find(|(option, _)| *option == lower)
    {
        return ApiError::bad_request(format!(
            "query option {option} is not supported: {reason}; supported are {SUPPORTED_OPTIONS}"
        ));
    }
    let with_dollar = format!("${lower}");
    if ["$top", "$filter", "$skiptoken"].contains(&with_dollar.as_str()) {
        return ApiError::bad_request(format!(
            "query option {name:?} is not supported; did you mean {with_dollar}?"
        ));
    }
    ApiError::bad_request(format!(
        "query option {name:?} is not supported; supported are {SUPPORTED_OPTIONS}"
    ))
}

fn parse_top(text: &str) -> Result<u32, ApiError> {
    let invalid = || {
        ApiError::bad_request(format!(
            "$top {text:?} is invalid; use a whole number from 1 to {MAX_TOP} (default {DEFAULT_TOP})"
        ))
    };
    // Digits only: u32::from_str would also take a leading "+".
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(invalid());
    }
    match text.parse::<u32>() {
        Ok(top) if (1..=MAX_TOP).contains(&top) => Ok(top),
        _ => Err(invalid()),
    }
}

/// Encodes the last row of a page as an opaque `$skiptoken`: base64url of
/// `<created_at millis>.<id>`.
pub fn encode_page_token(cursor: &Cursor) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}.{}", cursor.created_at.0, cursor.id))
}

/// Decodes a token made by [`encode_page_token`]. The error describes the
/// problem.
pub fn decode_page_token(token: &str) -> Result<Cursor, String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| "not base64url".to_owned())?;
    let text = String::from_utf8(bytes).map_err(|_| "not a page token".to_owned())?;
    let (millis, id) = text
        .split_once('.')
        .ok_or_else(|| "not a page token".to_owned())?;
    let created_at = millis
        .parse::<i64>()
        .map_err(|_| "not a page token".to_owned())?;
    let id = Uuid::try_parse(id).map_err(|_| "not a page token".to_owned())?;
    Ok(Cursor {
        created_at: Millis(created_at),
        id,
    })
}

/// Builds the `@odata.nextLink` for the page after `last`: the request's
/// path with the same `$top` and `$filter`. It is relative to the service's base URL,
/// so it stays right behind a proxy that changes the host or scheme.
pub fn next_link(path: &str, options: &ListOptions, last: &Cursor) -> String {
    let mut link = format!("{path}?$top={}", options.top);
    if let Some(filter) = &options.filter_text {
        link.push_str("&$filter=");
        link.extend(url::form_urlencoded::byte_serialize(filter.as_bytes()));
    }
    link.push_str("&$skiptoken=");
    link.push_str(&encode_page_token(last));
    link
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor() -> Cursor {
        Cursor {
            created_at: Millis(1_764_000_000_123),
            id: Uuid::parse_str("0190a0b2-7c3d-7e4f-8a9b-0c1d2e3f4a5b").unwrap(),
        }
    }

    fn message(query: &str) -> String {
        parse_list_options(Some(query)).unwrap_err().message
    }

    #[test]
    fn page_token_round_trips() {
        let token = encode_page_token(&cursor());
        assert_eq!(decode_page_token(&token), Ok(cursor()));
    }

    #[test]
    fn page_token_is_url_safe() {
        let token = encode_page_token(&cursor());
        assert!(
            token
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_'),
            "{token}"
        );
    }

    #[test]
    fn garbage_page_tokens_are_rejected() {
        for token in [
            "",
            "!!!",
            "bm90LWEtdG9rZW4", // "not-a-token"
            &URL_SAFE_NO_PAD.encode("12.not-a-uuid"),
            &URL_SAFE_NO_PAD.encode("x.0190a0b2-7c3d-7e4f-8a9b-0c1d2e3f4a5b"),
            &URL_SAFE_NO_PAD.encode([0xff, 0xfe]),
        ] {
            assert!(decode_page_token(token).is_err(), "{token:?} was accepted");
        }
    }

    #[test]
    fn defaults_apply_without_options() {
        let options = parse_list_options(None).unwrap();
        assert_eq!(options.top, DEFAULT_TOP);
        assert_eq!(options.filter, Filter::default());
        assert!(options.after.is_none());
    }

    #[test]
    fn top_is_bounded() {
        assert_eq!(parse_list_options(Some("$top=1000")).unwrap().top, 1000);
        for top in ["0", "1001", "-1", "+5", "1.5", "ten", ""] {
            let text = message(&format!("$top={top}"));
            assert!(text.contains("from 1 to 1000"), "{top}: {text}");
        }
    }

    #[test]
    fn option_names_match_in_any_case() {
        assert_eq!(parse_list_options(Some("$TOP=5")).unwrap().top, 5);
    }

    #[test]
    fn repeated_options_are_rejected() {
        assert!(message("$top=5&$Top=6").contains("more than once"));
    }

    #[test]
    fn unsupported_options_are_named() {
        assert!(message("$orderby=CreatedDateTime").contains("$orderby is not supported"));
        assert!(message("$skip=10").contains("$skip is not supported"));
        assert!(message("top=10").contains("did you mean $top"));
        assert!(message("color=red").contains("\"color\""));
    }

    #[test]
    fn next_link_keeps_top_and_filter() {
        let options = parse_list_options(Some("$top=5&$filter=Status%20eq%20'queued'")).unwrap();
        let link = next_link("/devices/d/commands", &options, &cursor());
        let query = link.split_once('?').unwrap().1;
        let again = parse_list_options(Some(query)).unwrap();
        assert_eq!(again.top, 5);
        assert_eq!(again.filter_text.as_deref(), Some("Status eq 'queued'"));
        assert_eq!(again.after, Some(cursor()));
    }
}
