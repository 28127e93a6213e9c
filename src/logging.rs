//! Log output of the `dispatcher` binary: lines on stderr, filtered by
//! `DISPATCHER_LOG`, with ANSI colours only where a person reads them.

use std::ffi::OsStr;
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber that writes log lines to stderr.
pub fn init() {
    let ansi = use_ansi_colors(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("DISPATCHER_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

/// Decides whether log lines get ANSI colour codes: only when stderr is a
/// terminal and `NO_COLOR` is unset or empty. Logs redirected to a file,
/// a pipe or a log collector so stay plain text.
pub fn use_ansi_colors(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(OsStr::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colors_only_on_terminal_without_no_color() {
        let cases = [
            (true, None, true),
            (true, Some(""), true),
            (true, Some("1"), false),
            (true, Some("0"), false),
            (false, None, false),
            (false, Some(""), false),
            (false, Some("1"), false),
        ];
        for (terminal, no_color, expected) in cases {
            let actual = use_ansi_colors(terminal, no_color.map(OsStr::new));
            assert_eq!(
                actual, expected,
                "terminal {terminal}, NO_COLOR {no_color:?}"
            );
        }
    }
}
