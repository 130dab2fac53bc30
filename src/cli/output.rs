//! Everything a command prints on standard output goes through here: lines ([`outln!`]), raw
//! bytes, pretty and one-line JSON, aligned tables ([`Table`]) and labelled values ([`Fields`]).
//! `println!` is denied in `cli/` so that nothing bypasses it.
//!
//! Invariant: a closed standard output (the reader of a pipe went away: `app doctor | head -1`)
//! ends the process quietly with 141 (128 + SIGPIPE), what a shell reports for a command killed
//! by SIGPIPE, as git does. `app` ignores SIGPIPE (Rust's runtime does), so the write
//! fails with EPIPE instead; it happens at the first line written after the reader left. The exit
//! skips destructors: every command prints only what it has already done (a message received
//! but not yet acknowledged is delivered again, as after a crash). Any other failure to write a
//! line panics with `println!`'s message, as before.

use std::fmt::{self, Display};
use std::io::{self, StdoutLock, Write};

use nix::sys::signal::Signal;
use serde::Serialize;

use crate::process;

/// Prints a line on standard output, as `println!` does (see the module's invariant).
macro_rules! outln {
    () => {
        $crate::cli::output::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::line(format_args!($($arg)*))
    };
}
pub(super) use outln;

/// Writes to standard output through `write`; a closed output ends the process quietly.
fn write_stdout(write: impl FnOnce(&mut StdoutLock<'static>) -> io::Result<()>) -> io::Result<()> {
    let result = write(&mut io::stdout().lock());
    if let Err(err) = &result
        && err.kind() == io::ErrorKind::BrokenPipe
    {
        let code = process::signal_exit_code(Signal::SIGPIPE as i32);
        std::process::exit(i32::from(code));
    }
    result
}

/// One line on standard output: what [`outln!`] expands to.
pub(super) fn line(args: fmt::Arguments<'_>) {
    if let Err(err) = write_stdout(|out| writeln!(out, "{args}")) {
        panic!("failed printing to stdout: {err}");
    }
}

/// Bytes as they are (another process's output, a log), flushed; errors other than a closed
/// output are the caller's.
pub(super) fn bytes(data: &[u8]) -> io::Result<()> {
    write_stdout(|out| {
        out.write_all(data)?;
        out.flush()
    })
}

/// A value as pretty JSON, on lines of its own.
pub(super) fn json(value: &impl Serialize) {
    outln!(
        "{}",
        serde_json::to_string_pretty(value).expect("in-memory values serialize")
    );
}

/// A value as JSON on one line (for streams: one object per line).
pub(super) fn json_line(value: &impl Serialize) {
    outln!(
        "{}",
        serde_json::to_string(value).expect("in-memory values serialize")
    );
}

/// Rows under a header, in left-aligned columns as wide as their widest cell (header
/// included), two spaces apart. The last column is not padded, and each line loses its
/// trailing whitespace (an empty last cell leaves no gap behind).
#[derive(Debug)]
pub(super) struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers and no rows yet.
    pub fn new(header: &[&str]) -> Self {
        Table {
            rows: vec![header.iter().map(|cell| cell.to_string()).collect()],
        }
    }

    /// Adds a row: one cell per column.
    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.rows[0].len(), "one cell per column");
        self.rows.push(cells);
    }

    /// Prints the header and the rows.
    pub fn print(&self) {
        for line in self.lines() {
            outln!("{line}");
        }
    }

    fn lines(&self) -> Vec<String> {
        let columns = self.rows[0].len();
        let widths: Vec<usize> = (0..columns)
            .map(|col| {
                let cells = self.rows.iter().map(|row| row[col].chars().count());
                cells.max().unwrap_or(0)
            })
            .collect();
        self.rows
            .iter()
            .map(|row| {
                let cells: Vec<String> = row
                    .iter()
                    .enumerate()
                    .map(|(col, cell)| {
                        if col + 1 == row.len() {
                            cell.clone()
                        } else {
                            format!("{cell:<width$}", width = widths[col])
                        }
                    })
                    .collect();
                cells.join("  ").trim_end().to_string()
            })
            .collect()
    }
}

/// Labelled values, one `label: value` per line, every value starting `gap` spaces after the
/// longest label's colon. Values are printed as they are (trailing spaces kept).
#[derive(Debug)]
pub(super) struct Fields {
    gap: usize,
    fields: Vec<(&'static str, String)>,
}

impl Fields {
    /// An empty list whose values start `gap` spaces after the longest label's colon.
    pub fn new(gap: usize) -> Self {
        Fields {
            gap,
            fields: Vec::new(),
        }
    }

    /// Adds `label: value`.
    pub fn field(&mut self, label: &'static str, value: impl Display) -> &mut Self {
        self.fields.push((label, value.to_string()));
        self
    }

    /// Prints every field.
    pub fn print(&self) {
        for line in self.lines() {
            outln!("{line}");
        }
    }

    fn lines(&self) -> Vec<String> {
        let width = self.fields.iter().map(|(label, _)| label.len() + 1).max();
        let width = width.unwrap_or(0) + self.gap;
        self.fields
            .iter()
            .map(|(label, value)| format!("{:<width$}{value}", format!("{label}:")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_pads_all_but_the_last_column_and_trims_lines() {
        let mut table = Table::new(&["ID", "STATUS", "DETAIL"]);
        table.row(vec!["a".into(), "running".into(), "long detail".into()]);
        table.row(vec!["abcdef".into(), "ok".into(), String::new()]);
        table.row(vec!["é".into(), "x".into(), "trailing  ".into()]);
        assert_eq!(
            table.lines(),
            [
                "ID      STATUS   DETAIL",
                "a       running  long detail",
                "abcdef  ok",
                "é       x        trailing",
            ]
        );
    }

    #[test]
    fn a_table_without_rows_is_its_header() {
        assert_eq!(Table::new(&["RUN", "STATUS"]).lines(), ["RUN  STATUS"]);
    }

    #[test]
    fn fields_align_values_after_the_longest_label() {
        let mut fields = Fields::new(2);
        fields
            .field("id", "3f9a")
            .field("child pid", "-")
            .field("cmd", "a ");
        assert_eq!(
            fields.lines(),
            ["id:         3f9a", "child pid:  -", "cmd:        a "]
        );
        let mut tight = Fields::new(1);
        tight.field("schema version", 3).field("wal", "-");
        assert_eq!(tight.lines(), ["schema version: 3", "wal:            -"]);
    }
}
