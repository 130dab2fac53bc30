//! TCP port leases: a block of consecutive ports per instance, so parallel agents can each start
//! a dev server without colliding.
//!
//! Invariants:
//! - A lease is recorded in the instance's registry entry, chosen under the registry lock, so
//!   two instances starting at once never get overlapping blocks; it ends with the entry.
//! - A port is leased only when no live instance holds it and it can be bound on 127.0.0.1 at
//!   that moment (a port some other program listens on is skipped).

use std::collections::HashSet;
use std::net::TcpListener;
use std::ops::RangeInclusive;

use crate::error::{Error, Result};

/// Most ports one instance may lease.
pub const MAX_LEASE: usize = 64;

/// Checks a requested lease size.
pub fn validate_count(count: usize) -> Result<()> {
    if count == 0 || count > MAX_LEASE {
        return Err(Error::bad_input(format!(
            "--ports {count}: lease between 1 and {MAX_LEASE} ports"
        )));
    }
    Ok(())
}

/// The first block of `count` consecutive ports in `range` that `taken` does not hold and that
/// can be bound on 127.0.0.1 now.
pub fn lease(count: usize, taken: &HashSet<u16>, range: RangeInclusive<u16>) -> Option<Vec<u16>> {
    let free = |port: u16| !taken.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok();
    let mut block = Vec::with_capacity(count);
    for port in range {
        if free(port) {
            block.push(port);
            if block.len() == count {
                return Some(block);
            }
        } else {
            block.clear();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_skip_taken_and_bound_ports() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let bound = listener.local_addr().unwrap().port();
        let low = bound.saturating_sub(3).max(1);
        let taken: HashSet<u16> = [low].into_iter().collect();
        let block = lease(2, &taken, low..=bound.saturating_add(10)).unwrap();
        assert!(
            !block.contains(&low) && !block.contains(&bound),
            "{block:?}"
        );
        assert_eq!(block[1], block[0] + 1);
        assert_eq!(lease(3, &HashSet::new(), bound..=bound), None);
    }

    #[test]
    fn counts_are_bounded() {
        assert!(validate_count(0).is_err());
        assert!(validate_count(MAX_LEASE + 1).is_err());
        validate_count(3).unwrap();
    }
}
