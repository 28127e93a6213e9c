//! A strict parser for the small part of OData's `$filter` that command
//! listings support. It is not a general OData engine: any other property,
//! operator or literal is rejected with a message that lists what works.
//!
//! Grammar (keywords and property names match in any letter case):
//!
//! ```text
//! filter     = clause *( "and" clause )
//! clause     = "(" filter ")" / status / created
//! status     = "Status" ( "eq" / "ne" ) string
//!            / "Status" "in" "(" string *( "," string ) ")"
//! created    = "CreatedDateTime" ( "gt" / "ge" / "lt" / "le" ) datetime
//! string     = "'" *( any character except "'" / "''" ) "'"
//! datetime   = ISO 8601 date and time with offset, bare or in quotes
//! ```

use chrono::DateTime;

use crate::command::Millis;
use crate::domain::CommandStatus;

/// Summary of the supported syntax, for error messages.
pub const SUPPORTED: &str = "supported are Status eq 'queued', Status ne 'queued', \
     Status in ('queued','executing'), CreatedDateTime gt|ge|lt|le 2030-01-31T12:00:00Z, \
     and clauses joined with and";

/// Longest accepted `$filter` text, in bytes.
pub const MAX_FILTER_BYTES: usize = 2048;

/// A parsed filter: the statuses to return and strict time bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    /// Every status a returned command may have, in [`CommandStatus::ALL`]
    /// order; empty when the clauses contradict each other.
    pub statuses: Vec<CommandStatus>,
    /// Only commands created strictly after this time.
    pub created_after: Option<Millis>,
    /// Only commands created strictly before this time.
    pub created_before: Option<Millis>,
}

impl Default for Filter {
    fn default() -> Self {
        Self {
            statuses: CommandStatus::ALL.to_vec(),
            created_after: None,
            created_before: None,
        }
    }
}

impl Filter {
    fn keep_statuses(&mut self, allowed: &[CommandStatus]) {
        self.statuses.retain(|status| allowed.contains(status));
    }

    fn after(&mut self, at: Millis) {
        self.created_after = Some(self.created_after.map_or(at, |old| old.max(at)));
    }

    fn before(&mut self, at: Millis) {
        self.created_before = Some(self.created_before.map_or(at, |old| old.min(at)));
    }
}

/// Parses a `$filter` value. The error is a sentence for the client.
pub fn parse(text: &str) -> Result<Filter, String> {
    if text.len() > MAX_FILTER_BYTES {
        return Err(format!(
            "$filter is {} bytes long; the maximum is {MAX_FILTER_BYTES}",
            text.len()
        ));
    }
    let tokens = tokenize(text)?;
    let mut parser = Parser {
        tokens,
        position: 0,
        filter: Filter::default(),
    };
    parser.filter_expression(0)?;
    if let Some(token) = parser.peek() {
        return Err(format!(
            "$filter has unexpected {} after a complete clause; join clauses with and ({SUPPORTED})",
            token.describe()
        ));
    }
    Ok(parser.filter)
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Word(String),
    Text(String),
    Open,
    Close,
    Comma,
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Self::Word(word) => format!("{word:?}"),
            Self::Text(text) => format!("the string '{text}'"),
            Self::Open => "\"(\"".to_owned(),
            Self::Close => "\")\"".to_owned(),
            Self::Comma => "\",\"".to_owned(),
        }
    }

    fn is_word(&self, expected: &str) -> bool {
        matches!(self, Self::Word(word) if word.eq_ignore_ascii_case(expected))
    }
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        match c {
            c if c.is_whitespace() => {}
            '(' => tokens.push(Token::Open),
            ')' => tokens.push(Token::Close),
            ',' => tokens.push(Token::Comma),
            '\'' => {
                let mut value = String::new();
                loop {
                    match chars.next() {
                        // Two quotes inside a string are one quote.
                        Some((_, '\'')) if chars.peek().is_some_and(|(_, next)| *next == '\'') => {
                            chars.next();
                            value.push('\'');
                        }
                        Some((_, '\'')) => break,
                        Some((_, other)) => value.push(other),
                        None => {
                            return Err(format!(
                                "$filter has a string that starts at byte {start} and is never closed; end it with '"
                            ));
                        }
                    }
                }
                tokens.push(Token::Text(value));
            }
            _ => {
                let mut end = start + c.len_utf8();
                while let Some((index, next)) = chars.peek().copied() {
                    if next.is_whitespace() || matches!(next, '(' | ')' | ',' | '\'') {
                        break;
                    }
                    end = index + next.len_utf8();
                    chars.next();
                }
                tokens.push(Token::Word(text[start..end].to_owned()));
            }
        }
    }
    Ok(tokens)
}

/// Deepest accepted nesting of parentheses.
const MAX_DEPTH: usize = 16;

struct Parser {
    tokens: Vec<Token>,
    position: usize,
    filter: Filter,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.position)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.position).cloned();
        self.position += 1;
        token
    }

    fn filter_expression(&mut self, depth: usize) -> Result<(), String> {
        self.clause(depth)?;
        while let Some(token) = self.peek() {
            if token.is_word("and") {
                self.next();
                self.clause(depth)?;
            } else if token.is_word("or") || token.is_word("not") {
                return Err(format!(
                    "$filter operator {} is not supported; {SUPPORTED}",
                    token.describe()
                ));
            } else {
                break;
            }
        }
        Ok(())
    }

    fn clause(&mut self, depth: usize) -> Result<(), String> {
        match self.next() {
            None => Err(format!(
                "$filter ends where a clause is expected; {SUPPORTED}"
            )),
            Some(Token::Open) => {
                if depth >= MAX_DEPTH {
                    return Err(format!(
                        "$filter nests parentheses deeper than {MAX_DEPTH} levels"
                    ));
                }
                self.filter_expression(depth + 1)?;
                match self.next() {
                    Some(Token::Close) => Ok(()),
                    _ => Err("$filter has a \"(\" that is never closed; add \")\"".to_owned()),
                }
            }
            Some(token) if token.is_word("Status") => self.status_clause(),
            Some(token) if token.is_word("CreatedDateTime") => self.created_clause(),
            Some(Token::Word(word)) if word.eq_ignore_ascii_case("not") => Err(format!(
                "$filter operator \"not\" is not supported; {SUPPORTED}"
            )),
            Some(Token::Word(word)) => Err(format!(
                "$filter property {word:?} cannot be filtered on; {SUPPORTED}"
            )),
            Some(token) => Err(format!(
                "$filter has {} where a property name is expected; {SUPPORTED}",
                token.describe()
            )),
        }
    }

    fn status_clause(&mut self) -> Result<(), String> {
        let operator = self.operator("Status", &["eq", "ne", "in"])?;
        match operator.as_str() {
            "eq" => {
                let status = self.status_value()?;
                self.filter.keep_statuses(&[status]);
            }
            "ne" => {
                let status = self.status_value()?;
                let others: Vec<_> = CommandStatus::ALL
                    .into_iter()
                    .filter(|other| *other != status)
                    .collect();
                self.filter.keep_statuses(&others);
            }
            _ => {
                if self.next() != Some(Token::Open) {
                    return Err(
                        "$filter Status in needs a list in parentheses, such as Status in ('queued','executing')"
                            .to_owned(),
                    );
                }
                let mut listed = vec![self.status_value()?];
                loop {
                    match self.next() {
                        Some(Token::Comma) => listed.push(self.status_value()?),
                        Some(Token::Close) => break,
                        _ => {
                            return Err("$filter Status in list must be strings separated by commas and closed with \")\"".to_owned());
                        }
                    }
                }
                self.filter.keep_statuses(&listed);
            }
        }
        Ok(())
    }

    fn created_clause(&mut self) -> Result<(), String> {
        let operator = self.operator("CreatedDateTime", &["gt", "ge", "lt", "le"])?;
        let text = match self.next() {
            Some(Token::Word(text) | Token::Text(text)) => text,
            other => {
                return Err(format!(
                    "$filter CreatedDateTime {operator} needs a date and time such as 2030-01-31T12:00:00Z, got {}",
                    other.map_or_else(
                        || "the end of the filter".to_owned(),
                        |token| token.describe()
                    )
                ));
            }
        };
        let at = DateTime::parse_from_rfc3339(&text).map_err(|error| {
            format!(
                "$filter value {text:?} is not an ISO 8601 date and time with offset, such as 2030-01-31T12:00:00Z \
                 (in a URL, write + as %2B): {error}"
            )
        })?;
        // Stored times are whole milliseconds, so a bound with a fraction
        // of a millisecond rounds to the bound that selects the same rows.
        let floor = Millis(at.timestamp_millis());
        let has_fraction = at.timestamp_subsec_nanos() % 1_000_000 != 0;
        let ceil = Millis(floor.0 + i64::from(has_fraction));
        match operator.as_str() {
            "gt" => self.filter.after(floor),
            "ge" => self.filter.after(Millis(ceil.0 - 1)),
            "lt" => self.filter.before(ceil),
            _ => self.filter.before(Millis(floor.0 + 1)),
        }
        Ok(())
    }

    /// Reads an operator that must be one of `allowed`, in lower case.
    fn operator(&mut self, property: &str, allowed: &[&str]) -> Result<String, String> {
        match self.next() {
            Some(Token::Word(word))
                if allowed
                    .iter()
                    .any(|operator| operator.eq_ignore_ascii_case(&word)) =>
            {
                Ok(word.to_ascii_lowercase())
            }
            other => Err(format!(
                "$filter on {property} supports the operators {}, got {}",
                allowed.join(", "),
                other.map_or_else(
                    || "the end of the filter".to_owned(),
                    |token| token.describe()
                )
            )),
        }
    }

    fn status_value(&mut self) -> Result<CommandStatus, String> {
        let names = || {
            CommandStatus::ALL
                .iter()
                .map(|status| format!("'{status}'"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self.next() {
            Some(Token::Text(text)) => text.parse().map_err(|_| {
                format!(
                    "$filter Status value '{text}' is not a command status; use one of {}",
                    names()
                )
            }),
            other => Err(format!(
                "$filter Status needs a status in single quotes, such as 'queued', got {}",
                other.map_or_else(
                    || "the end of the filter".to_owned(),
                    |token| token.describe()
                )
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CommandStatus::*;

    fn statuses(text: &str) -> Vec<CommandStatus> {
        parse(text).unwrap().statuses
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err()
    }

    #[test]
    fn status_eq_selects_one_status() {
        assert_eq!(statuses("Status eq 'queued'"), vec![Queued]);
    }

    #[test]
    fn keywords_and_values_match_in_any_case() {
        assert_eq!(statuses("status EQ 'Completed'"), vec![Completed]);
    }

    #[test]
    fn status_in_selects_the_listed_statuses() {
        assert_eq!(
            statuses("Status in ('executing', 'queued')"),
            vec![Queued, Executing]
        );
    }

    #[test]
    fn status_ne_selects_the_others() {
        let selected = statuses("Status ne 'queued'");
        assert_eq!(selected.len(), CommandStatus::ALL.len() - 1);
        assert!(!selected.contains(&Queued));
    }

    #[test]
    fn and_intersects_clauses() {
        assert_eq!(
            statuses("Status in ('queued','executing') and Status ne 'queued'"),
            vec![Executing]
        );
        assert!(statuses("Status eq 'queued' and Status eq 'completed'").is_empty());
    }

    #[test]
    fn parentheses_group_clauses() {
        assert_eq!(
            statuses("(Status eq 'queued') and (CreatedDateTime gt 2020-01-01T00:00:00Z)"),
            vec![Queued]
        );
    }

    #[test]
    fn created_bounds_are_strict_millis() {
        let filter = parse(
            "CreatedDateTime gt 2030-01-31T12:00:00Z and CreatedDateTime lt '2030-01-31T13:00:00.5+01:00'",
        )
        .unwrap();
        assert_eq!(filter.created_after, Some(Millis(1_896_091_200_000)));
        assert_eq!(filter.created_before, Some(Millis(1_896_091_200_500)));
    }

    #[test]
    fn inclusive_bounds_widen_by_one_milli() {
        let filter = parse(
            "CreatedDateTime ge 1970-01-01T00:00:01Z and CreatedDateTime le 1970-01-01T00:00:02Z",
        )
        .unwrap();
        assert_eq!(filter.created_after, Some(Millis(999)));
        assert_eq!(filter.created_before, Some(Millis(2001)));
    }

    #[test]
    fn sub_millisecond_bounds_round_outwards_correctly() {
        let filter = parse(
            "CreatedDateTime gt 1970-01-01T00:00:00.0005Z and CreatedDateTime lt 1970-01-01T00:00:00.0025Z",
        )
        .unwrap();
        // Whole milliseconds m with 0.5 < m < 2.5 are 1 and 2.
        assert_eq!(filter.created_after, Some(Millis(0)));
        assert_eq!(filter.created_before, Some(Millis(3)));
    }

    #[test]
    fn repeated_bounds_keep_the_tightest() {
        let filter = parse(
            "CreatedDateTime gt 1970-01-01T00:00:01Z and CreatedDateTime gt 1970-01-01T00:00:05Z",
        )
        .unwrap();
        assert_eq!(filter.created_after, Some(Millis(5000)));
    }

    #[test]
    fn quotes_inside_strings_are_doubled() {
        assert!(error("Status eq 'it''s'").contains("'it's'"));
    }

    #[test]
    fn unknown_property_is_named() {
        let message = error("DeviceId eq 'kiosk-1'");
        assert!(message.contains("\"DeviceId\""), "{message}");
        assert!(message.contains("supported are"), "{message}");
    }

    #[test]
    fn unsupported_operators_are_named() {
        assert!(error("Status eq 'queued' or Status eq 'executing'").contains("\"or\""));
        assert!(error("not Status eq 'queued'").contains("\"not\""));
        assert!(error("Status gt 'queued'").contains("eq, ne, in"));
        assert!(error("CreatedDateTime eq 2030-01-01T00:00:00Z").contains("gt, ge, lt, le"));
    }

    #[test]
    fn unknown_status_lists_the_valid_ones() {
        let message = error("Status eq 'done'");
        assert!(message.contains("'done'"), "{message}");
        assert!(message.contains("'sentToTarget'"), "{message}");
    }

    #[test]
    fn malformed_filters_are_rejected() {
        for text in [
            "",
            "Status",
            "Status eq",
            "Status eq queued",
            "Status eq 'queued",
            "Status in 'queued'",
            "Status in ('queued'",
            "Status in ('queued' 'executing')",
            "(Status eq 'queued'",
            "Status eq 'queued')",
            "Status eq 'queued' and",
            "Status eq 'queued' Status eq 'queued'",
            "CreatedDateTime gt yesterday",
            "CreatedDateTime gt 2030-01-01",
            "CreatedDateTime gt 2030-01-01T00:00:00",
            "CreatedDateTime gt 2030-01-01T00:00:00 01:00",
        ] {
            assert!(parse(text).is_err(), "{text:?} was accepted");
        }
    }

    #[test]
    fn deep_parentheses_are_rejected() {
        let text = format!("{}Status eq 'queued'{}", "(".repeat(40), ")".repeat(40));
        assert!(error(&text).contains("deeper"));
    }

    #[test]
    fn long_filters_are_rejected() {
        let text = "Status eq 'queued' and ".repeat(200) + "Status eq 'queued'";
        assert!(error(&text).contains("maximum"));
    }
}
