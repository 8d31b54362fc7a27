//! Human-readable sizes, durations and times, shared by the CLI and the daemon's messages:
//! parsing `--size 100G` and printing `1.5 GiB`. Units are binary (K = KiB = 1024), as LVM
//! and ZFS use them.

/// A size or duration that does not parse; the message quotes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadValue(pub String);

type Result<T> = std::result::Result<T, BadValue>;

macro_rules! bail {
    ($($t:tt)*) => { return Err(BadValue(format!($($t)*))) };
}

pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        bail!(
            "invalid size '{s}': expected a number with an optional unit (K, M, G, T, P), e.g. 10G"
        );
    }
    let n: u64 = t[..digits_end]
        .parse()
        .map_err(|_| BadValue(format!("invalid size '{s}': number too large")))?;
    let unit = t[digits_end..].trim();
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        _ => bail!("invalid size '{s}': unknown unit '{unit}' (use K, M, G, T or P)"),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| BadValue(format!("invalid size '{s}': too large")))
}

pub fn format_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else if v >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Parses a duration: `90`, `90s`, `30m`, `12h`, `7d`.
pub fn parse_duration(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 's')) => (&t[..i], 1),
        Some((i, 'm')) => (&t[..i], 60),
        Some((i, 'h')) => (&t[..i], 3600),
        Some((i, 'd')) => (&t[..i], 86_400),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| BadValue(format!("{s:?} is not a duration (like 90s, 30m, 12h, 7d)")))
}

/// Formats seconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn format_time(secs: u64) -> String {
    let rem = secs % 86_400;
    let (y, m, d) = snapblk_backup::prune::civil_from_days((secs / 86_400) as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1TiB").unwrap(), 1 << 40);
        assert_eq!(parse_size("512 m").unwrap(), 512 << 20);
        for bad in [
            "",
            "G",
            "-1",
            "1.5G",
            "10X",
            "99999999999999999999",
            "20000000P",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(10 << 30), "10 GiB");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0").unwrap(), 0);
        assert_eq!(parse_duration("90s").unwrap(), 90);
        assert_eq!(parse_duration("2h").unwrap(), 7200);
        assert_eq!(parse_duration("1d").unwrap(), 86_400);
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}
