//! Statuses the database stores as text: one enum per column, written and read as the same
//! words, so a row never holds a word this `app` does not know without saying so.

use libsql::Value;

use super::text;
use crate::error::{DbError, Result};

/// Declares a status enum stored as the text in its table; `parse` is the inverse of `as_str`.
macro_rules! stored_status {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            /// The text stored in the database and shown to users.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// The status stored as `text`.
            pub fn parse(text: &str) -> Option<$name> {
                match text {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, text: &&str) -> bool {
                self.as_str() == *text
            }
        }
    };
}

pub(super) use stored_status;

/// The status in column `column` of a row, which an older or newer `app` may have written.
pub(super) fn parse<T>(value: &Value, column: &str, parse: fn(&str) -> Option<T>) -> Result<T> {
    let text = text(value);
    match parse(&text) {
        Some(status) => Ok(status),
        None => Err(DbError::UnknownStatus {
            column: column.to_string(),
            text,
        }
        .into()),
    }
}
