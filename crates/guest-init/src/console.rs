//! Error reporting on the console (init's stderr, which the kernel points at
//! `/dev/console`). Runs on init's only thread. Never panics: write errors are
//! ignored because there is nowhere else to report them.

use std::fmt::Display;
use std::io::Write;

/// Formats the one-line message `locald-init: <what>: <err>`, dropping the
/// ` (os error N)` suffix that `io::Error` appends.
pub fn format(what: &dyn Display, err: &dyn Display) -> String {
    format!("locald-init: {what}: {}\n", describe(err))
}

/// `err` as text without the ` (os error N)` suffix of `io::Error`.
pub fn describe(err: &dyn Display) -> String {
    let mut err = err.to_string();
    if let Some(i) = err.rfind(" (os error ") {
        if err.ends_with(')') {
            err.truncate(i);
        }
    }
    err
}

/// Prints `locald-init: <what>: <err>` to stderr in a single write.
pub fn error(what: impl Display, err: impl Display) {
    let line = format(&what, &err);
    let _ = std::io::stderr().write_all(line.as_bytes());
}

#[cfg(test)]
mod tests {
    #[test]
    fn message_format() {
        assert_eq!(
            super::format(&"mount /proc", &"No such device"),
            "locald-init: mount /proc: No such device\n"
        );
        let e = std::io::Error::from_raw_os_error(2);
        assert_eq!(
            super::format(&"cannot run 'foo'", &e),
            "locald-init: cannot run 'foo': No such file or directory\n"
        );
    }
}
