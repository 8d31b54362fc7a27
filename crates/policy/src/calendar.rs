//! Calendar schedules in the style of systemd's `OnCalendar=` (systemd.time(7)), the subset
//! admins write for snapshot and backup timers:
//!
//! * shorthands: `minutely`, `hourly`, `daily`, `weekly` (Monday 00:00), `monthly`,
//!   `quarterly`, `semiannually`, `yearly` / `annually`;
//! * `[WEEKDAYS] [[YEAR-]MONTH-DAY] [HOUR:MINUTE[:SECOND]]`, e.g. `*-*-* 02:00`,
//!   `Mon..Fri 18:00`, `Sat,Sun *-*-* 09:30:00`, `*:0/15` (every 15 minutes), `*:*:0/5`;
//! * each number field is `*`, a number, a range `A..B`, a list `A,B`, each optionally with a
//!   repetition `/STEP` (`*/STEP` and `A/STEP` run from A to the field's maximum).
//!
//! An omitted date is `*-*-*`; an omitted time is `00:00:00`; omitted seconds are `00`. Times
//! are civil times in the time zone the caller gives: a time skipped by a DST change fires at
//! the first instant after the gap (systemd does the same), a repeated one fires once.
//!
//! Parsing bounds everything it reads (field values, list lengths, text length), and
//! [`CalendarEvent::next_after`] visits at most one day per matching day of the search plus
//! one step per skipped month or year, up to year 9999: it cannot loop forever.

use std::fmt;
use std::str::FromStr;

use jiff::civil::{Date, DateTime, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

/// A schedule expression that could not be parsed: the text and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("calendar expression '{text}': {why}")]
pub struct ParseError {
    pub text: String,
    pub why: String,
}

/// The longest expression accepted.
const MAX_TEXT: usize = 256;
/// Years a schedule may name.
const MIN_YEAR: i64 = 1970;
const MAX_YEAR: i64 = 9999;

/// A set of values of one field, as a bit set (fields other than the year fit in 64 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bits(u64);

impl Bits {
    fn has(self, v: i64) -> bool {
        (0..64).contains(&v) && self.0 & (1u64 << v) != 0
    }
    /// The smallest member ≥ `v`.
    fn at_or_after(self, v: i64) -> Option<i64> {
        if v >= 64 {
            return None;
        }
        let v = v.max(0);
        let rest = self.0 >> v;
        (rest != 0).then(|| v + i64::from(rest.trailing_zeros()))
    }
}

/// Years: any, or a list of ranges with steps.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Years {
    Any,
    Some(Vec<(i64, i64, i64)>),
}

impl Years {
    fn has(&self, y: i64) -> bool {
        match self {
            Years::Any => true,
            Years::Some(r) => r
                .iter()
                .any(|&(a, b, s)| y >= a && y <= b && (y - a) % s == 0),
        }
    }
    fn at_or_after(&self, y: i64) -> Option<i64> {
        match self {
            Years::Any => (y <= MAX_YEAR).then_some(y),
            Years::Some(r) => r
                .iter()
                .filter_map(|&(a, b, s)| {
                    let first = if y <= a {
                        a
                    } else {
                        a + (y - a + s - 1) / s * s
                    };
                    (first <= b).then_some(first)
                })
                .min(),
        }
    }
}

/// A parsed calendar schedule. `Display` prints the normalised form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalendarEvent {
    text: String,
    /// Bit 0 = Monday … bit 6 = Sunday.
    weekdays: u8,
    years: Years,
    months: Bits,
    days: Bits,
    hours: Bits,
    minutes: Bits,
    seconds: Bits,
}

impl fmt::Display for CalendarEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for CalendarEvent {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        CalendarEvent::parse(s)
    }
}

impl serde::Serialize for CalendarEvent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for CalendarEvent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        CalendarEvent::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn expand_shorthand(s: &str) -> Option<&'static str> {
    Some(match s {
        "minutely" => "*-*-* *:*:00",
        "hourly" => "*-*-* *:00:00",
        "daily" => "*-*-* 00:00:00",
        "weekly" => "Mon *-*-* 00:00:00",
        "monthly" => "*-*-01 00:00:00",
        "quarterly" => "*-01,04,07,10-01 00:00:00",
        "semiannually" => "*-01,07-01 00:00:00",
        "yearly" | "annually" => "*-01-01 00:00:00",
        _ => return None,
    })
}

const WEEKDAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

fn weekday_index(name: &str) -> Option<u8> {
    let n = name.to_ascii_lowercase();
    if n.len() < 3 {
        return None;
    }
    WEEKDAYS
        .iter()
        .position(|w| w.starts_with(&n) && (n.len() == 3 || n.len() == w.len()))
        .map(|i| i as u8)
}

fn parse_weekdays(s: &str) -> Result<u8, String> {
    let mut mask = 0u8;
    for item in s.split(',') {
        let (a, b) = match item.split_once("..") {
            Some((a, b)) => (a, b),
            None => (item, item),
        };
        let a = weekday_index(a).ok_or_else(|| format!("unknown weekday '{a}'"))?;
        let b = weekday_index(b).ok_or_else(|| format!("unknown weekday '{b}'"))?;
        if a > b {
            return Err(format!("weekday range '{item}' runs backwards"));
        }
        for d in a..=b {
            mask |= 1 << d;
        }
    }
    Ok(mask)
}

fn number(s: &str, what: &str) -> Result<i64, String> {
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{what} '{s}' is not a number"));
    }
    s.parse()
        .map_err(|_| format!("{what} '{s}' is not a number"))
}

/// The `(from, to, step)` ranges of one field; `lo..=hi` bounds its values.
fn parse_ranges(s: &str, what: &str, lo: i64, hi: i64) -> Result<Vec<(i64, i64, i64)>, String> {
    let mut out = Vec::new();
    for item in s.split(',') {
        if out.len() >= 64 {
            return Err(format!("{what}: too many list items"));
        }
        let (range, step) = match item.split_once('/') {
            Some((r, st)) => (r, Some(number(st, what)?)),
            None => (item, None),
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once("..") {
            (number(a, what)?, number(b, what)?)
        } else {
            let a = number(range, what)?;
            // `A/STEP` repeats from A to the field's end.
            (a, if step.is_some() { hi } else { a })
        };
        if a < lo || b > hi || a > b {
            return Err(format!("{what} '{item}' outside {lo}..{hi}"));
        }
        let step = step.unwrap_or(1);
        if step < 1 {
            return Err(format!("{what} '{item}': step 0"));
        }
        out.push((a, b, step));
    }
    Ok(out)
}

fn bits(s: &str, what: &str, lo: i64, hi: i64) -> Result<Bits, String> {
    let mut b = 0u64;
    for (a, z, step) in parse_ranges(s, what, lo, hi)? {
        let mut v = a;
        while v <= z {
            b |= 1 << v;
            v += step;
        }
    }
    Ok(Bits(b))
}

impl CalendarEvent {
    /// Parses an expression (see the module doc).
    pub fn parse(text: &str) -> Result<CalendarEvent, ParseError> {
        let fail = |why: String| ParseError {
            text: text.chars().take(MAX_TEXT).collect(),
            why,
        };
        if text.len() > MAX_TEXT {
            return Err(fail(format!("longer than {MAX_TEXT} bytes")));
        }
        let trimmed = text.trim();
        let lower = trimmed.to_ascii_lowercase();
        let expanded = expand_shorthand(&lower).unwrap_or(trimmed);
        let mut ev = CalendarEvent {
            text: String::new(),
            weekdays: 0x7f,
            years: Years::Any,
            months: Bits(0),
            days: Bits(0),
            hours: Bits(1),
            minutes: Bits(1),
            seconds: Bits(1),
        };
        let (mut date, mut time) = ("*-*-*", None);
        let tokens: Vec<&str> = expanded.split_whitespace().collect();
        if tokens.is_empty() {
            return Err(fail("empty".into()));
        }
        if tokens.len() > 3 {
            return Err(fail("more than weekdays, a date and a time".into()));
        }
        let mut rest = &tokens[..];
        if rest[0].starts_with(|c: char| c.is_ascii_alphabetic()) {
            ev.weekdays = parse_weekdays(rest[0]).map_err(fail)?;
            rest = &rest[1..];
        }
        for t in rest {
            if t.contains(':') && time.is_none() {
                time = Some(*t);
            } else if t.contains('-') && date == "*-*-*" && time.is_none() {
                date = t;
            } else {
                return Err(fail(format!("unexpected '{t}'")));
            }
        }
        let parts: Vec<&str> = date.split('-').collect();
        let (y, m, d) = match parts[..] {
            [y, m, d] => (y, m, d),
            [m, d] => ("*", m, d),
            _ => return Err(fail(format!("date '{date}' is not [YEAR-]MONTH-DAY"))),
        };
        if y != "*" {
            ev.years = Years::Some(parse_ranges(y, "year", MIN_YEAR, MAX_YEAR).map_err(fail)?);
        }
        ev.months = bits(m, "month", 1, 12).map_err(fail)?;
        ev.days = bits(d, "day", 1, 31).map_err(fail)?;
        if let Some(t) = time {
            let parts: Vec<&str> = t.split(':').collect();
            let (h, mi, s) = match parts[..] {
                [h, mi, s] => (h, mi, s),
                [h, mi] => (h, mi, "0"),
                _ => return Err(fail(format!("time '{t}' is not HOUR:MINUTE[:SECOND]"))),
            };
            ev.hours = bits(h, "hour", 0, 23).map_err(fail)?;
            ev.minutes = bits(mi, "minute", 0, 59).map_err(fail)?;
            ev.seconds = bits(s, "second", 0, 59).map_err(fail)?;
        }
        ev.text = if tokens.len() == 1 && expand_shorthand(&lower).is_some() {
            lower
        } else {
            tokens.join(" ")
        };
        // A schedule that can never fire (e.g. `*-02-30`) is refused now, not at run time.
        let probe = Timestamp::from_second(0).expect("epoch");
        if ev.next_after(probe, &TimeZone::UTC).is_none() {
            return Err(fail("never matches a date".into()));
        }
        Ok(ev)
    }

    fn date_matches(&self, d: Date) -> bool {
        let wd = d.weekday().to_monday_zero_offset();
        self.weekdays & (1 << wd) != 0
            && self.years.has(i64::from(d.year()))
            && self.months.has(i64::from(d.month()))
            && self.days.has(i64::from(d.day()))
    }

    /// The first matching time of day at or after `t`.
    fn time_at_or_after(&self, t: Time) -> Option<Time> {
        let (mut h, mut m, mut s) = (
            i64::from(t.hour()),
            i64::from(t.minute()),
            i64::from(t.second()),
        );
        loop {
            let hh = self.hours.at_or_after(h)?;
            if hh != h {
                (m, s) = (0, 0);
            }
            match self.minutes.at_or_after(m) {
                Some(mm) => {
                    if mm != m {
                        s = 0;
                    }
                    match self.seconds.at_or_after(s) {
                        Some(ss) => {
                            return Time::new(hh as i8, mm as i8, ss as i8, 0).ok();
                        }
                        None => {
                            (h, m, s) = (hh, mm + 1, 0);
                            if m > 59 {
                                (h, m) = (hh + 1, 0);
                            }
                        }
                    }
                }
                None => (h, m, s) = (hh + 1, 0, 0),
            }
            if h > 23 {
                return None;
            }
        }
    }

    /// The first day ≥ `d` whose year and month match (skipping whole months and years).
    fn next_candidate_day(&self, mut d: Date) -> Option<Date> {
        loop {
            let y = i64::from(d.year());
            let ny = self.years.at_or_after(y)?;
            if ny != y {
                d = Date::new(i16::try_from(ny).ok()?, 1, 1).ok()?;
                continue;
            }
            let m = i64::from(d.month());
            match self.months.at_or_after(m) {
                Some(nm) if nm == m => {
                    // A month none of whose remaining days match (e.g. the 31st in April)
                    // is skipped whole.
                    match self.days.at_or_after(i64::from(d.day())) {
                        Some(day) if day <= i64::from(d.days_in_month()) => {
                            return d.with().day(day as i8).build().ok();
                        }
                        _ => {
                            d = d.first_of_month().checked_add(1.month()).ok()?;
                        }
                    }
                }
                Some(nm) => d = Date::new(d.year(), nm as i8, 1).ok()?,
                None => d = Date::new(d.year().checked_add(1)?, 1, 1).ok()?,
            }
        }
    }

    /// The first instant strictly after `after` at which this schedule fires, in time zone
    /// `tz`; `None` if it never fires again (a year list that ended, or past year 9999).
    pub fn next_after(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        // Whole seconds: the first candidate is the next whole second after `after`.
        let start = Timestamp::from_second(after.as_second())
            .ok()?
            .checked_add(1.second())
            .ok()?;
        let start_dt: DateTime = tz.to_datetime(start);
        let mut day = start_dt.date();
        let mut from = start_dt.time();
        loop {
            day = match self.next_candidate_day(day) {
                Some(d) if d == day => d,
                Some(d) => {
                    from = Time::midnight();
                    d
                }
                None => return None,
            };
            if self.date_matches(day) {
                let mut t = from;
                while let Some(hit) = self.time_at_or_after(t) {
                    let ts = tz
                        .to_ambiguous_timestamp(day.to_datetime(hit))
                        .compatible()
                        .ok()?;
                    if ts > after {
                        return Some(ts);
                    }
                    // A repeated (DST fold) or shifted time already past: the next one.
                    t = match hit.checked_add(1.second()) {
                        Ok(n) if n > hit => n,
                        _ => break,
                    };
                }
            }
            day = day.tomorrow().ok()?;
            from = Time::midnight();
            if day.year() > MAX_YEAR as i16 {
                return None;
            }
        }
    }

    /// Weekdays this schedule fires on (`Weekday::Monday` first).
    pub fn weekdays(&self) -> Vec<Weekday> {
        (0..7)
            .filter(|d| self.weekdays & (1 << d) != 0)
            .map(|d| Weekday::from_monday_zero_offset(d as i8).expect("0..7"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }
    fn next(expr: &str, after: &str) -> Option<String> {
        CalendarEvent::parse(expr)
            .unwrap()
            .next_after(ts(after), &TimeZone::UTC)
            .map(|t| t.to_string())
    }

    #[test]
    fn shorthands_and_common_forms() {
        assert_eq!(
            next("hourly", "2026-12-01T10:00:00Z").unwrap(),
            "2026-12-01T11:00:00Z"
        );
        assert_eq!(
            next("hourly", "2026-12-01T10:59:59Z").unwrap(),
            "2026-12-01T11:00:00Z"
        );
        assert_eq!(
            next("daily", "2026-12-01T10:00:00Z").unwrap(),
            "2026-12-02T00:00:00Z"
        );
        // 2026-12-01 is a Tuesday.
        assert_eq!(
            next("weekly", "2026-12-01T10:00:00Z").unwrap(),
            "2026-12-07T00:00:00Z"
        );
        assert_eq!(
            next("monthly", "2026-12-01T00:00:00Z").unwrap(),
            "2027-01-01T00:00:00Z"
        );
        assert_eq!(
            next("quarterly", "2026-05-01T00:00:00Z").unwrap(),
            "2026-07-01T00:00:00Z"
        );
        assert_eq!(
            next("*-*-* 02:00", "2026-12-01T02:00:00Z").unwrap(),
            "2026-12-02T02:00:00Z"
        );
        assert_eq!(
            next("Mon..Fri 18:00", "2026-12-04T18:00:00Z").unwrap(),
            "2026-12-07T18:00:00Z"
        );
        assert_eq!(
            next("Sat,Sun *-*-* 09:30:15", "2026-12-01T00:00:00Z").unwrap(),
            "2026-12-05T09:30:15Z"
        );
        assert_eq!(
            next("*:0/15", "2026-12-01T10:14:59Z").unwrap(),
            "2026-12-01T10:15:00Z"
        );
        assert_eq!(
            next("*:*:0/5", "2026-12-01T10:00:03Z").unwrap(),
            "2026-12-01T10:00:05Z"
        );
        assert_eq!(
            next("*-02-29 12:00", "2026-03-01T00:00:00Z").unwrap(),
            "2028-02-29T12:00:00Z"
        );
        assert_eq!(
            next("2027-*-* 00:00", "2026-03-01T00:00:00Z").unwrap(),
            "2027-01-01T00:00:00Z"
        );
        assert_eq!(next("2026-01-01", "2026-03-01T00:00:00Z"), None);
        assert_eq!(
            next("Mon *-02-29", "2026-01-01T00:00:00Z").unwrap(),
            "2044-02-29T00:00:00Z"
        );
    }

    #[test]
    fn bad_expressions_are_refused_with_a_reason() {
        for bad in [
            "",
            "hourlyy",
            "*-13-01",
            "*-*-32",
            "25:00",
            "*:60",
            "Mon..Sun..Tue",
            "Fri..Mon",
            "*-02-30",
            "*:*:*/0",
            "1-2-3-4",
            "x y z w",
            "*:0/99999",
            "funday",
        ] {
            let e = CalendarEvent::parse(bad);
            assert!(e.is_err(), "'{bad}' parsed as {e:?}");
        }
        let long = "*".repeat(300);
        assert!(CalendarEvent::parse(&long).is_err());
    }

    #[test]
    fn dst_gaps_fire_after_the_gap_and_folds_fire_once() {
        let tz = TimeZone::get("Europe/Berlin").unwrap();
        let ev = CalendarEvent::parse("*-*-* 02:30").unwrap();
        // 2026-03-29: 02:00 → 03:00 local. 02:30 does not exist: fires at 03:30 CEST = 01:30Z.
        let t = ev.next_after(ts("2026-03-28T12:00:00Z"), &tz).unwrap();
        assert_eq!(t.to_string(), "2026-03-29T01:30:00Z");
        // 2026-10-25: 03:00 → 02:00 local; 02:30 happens twice, fires at the first.
        let t = ev.next_after(ts("2026-10-24T12:00:00Z"), &tz).unwrap();
        assert_eq!(t.to_string(), "2026-10-25T00:30:00Z");
        let t2 = ev.next_after(t, &tz).unwrap();
        assert_eq!(t2.to_string(), "2026-10-26T01:30:00Z");
    }
}
