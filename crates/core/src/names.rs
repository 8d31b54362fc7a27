//! Validation of user-supplied names and the `vol@snap` syntax.

use crate::error::{Error, Result};

pub const MAX_NAME_LEN: usize = 128;

/// A volume or snapshot name: 1..=128 characters from `[A-Za-z0-9._+-]`, starting with a
/// letter or digit. No `@` or `/`, so `vol@snap` and export names stay unambiguous.
pub fn validate_name(kind: &'static str, name: &str) -> Result<()> {
    let bad = |why: &str| Error::invalid(kind, format!("'{}': {why}", name.escape_debug()));
    if name.is_empty() {
        return Err(bad("must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad(&format!("longer than {MAX_NAME_LEN} characters")));
    }
    let first = name.as_bytes()[0];
    if !first.is_ascii_alphanumeric() {
        return Err(bad("must start with a letter or digit"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-')))
    {
        return Err(bad(&format!(
            "character '{}' not allowed (use letters, digits, '.', '_', '+', '-')",
            c.escape_debug()
        )));
    }
    Ok(())
}

/// Splits `vol@snap`; both parts validated.
pub fn parse_snap_ref(s: &str) -> Result<(&str, &str)> {
    let (vol, snap) = s.split_once('@').ok_or_else(|| {
        Error::invalid(
            "snapshot reference",
            format!("'{s}' is not VOLUME@SNAPSHOT"),
        )
    })?;
    validate_name("volume name", vol)?;
    validate_name("snapshot name", snap)?;
    Ok((vol, snap))
}

/// Splits `vol` or `vol@snap`.
pub fn parse_target(s: &str) -> Result<(&str, Option<&str>)> {
    if s.contains('@') {
        let (v, sn) = parse_snap_ref(s)?;
        Ok((v, Some(sn)))
    } else {
        validate_name("volume name", s)?;
        Ok((s, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("volume name", "db-1.data_x+y").is_ok());
        for bad in ["", "-x", "a@b", "a/b", "a b", "é", &"x".repeat(129)] {
            assert!(validate_name("volume name", bad).is_err(), "{bad}");
        }
        assert_eq!(parse_snap_ref("db@s1").unwrap(), ("db", "s1"));
        assert!(parse_snap_ref("db").is_err());
        assert!(parse_snap_ref("db@").is_err());
        assert!(parse_snap_ref("@s").is_err());
        assert!(parse_snap_ref("a@b@c").is_err());
        assert_eq!(parse_target("db").unwrap(), ("db", None));
    }
}
