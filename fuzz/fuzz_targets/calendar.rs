//! Calendar schedules come from config files and the control socket: parsing any text and
//! computing the next elapse from any instant must end quickly and never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (t, text) = data.split_at(8);
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    if let Ok(ev) = snapblk_policy::CalendarEvent::parse(text) {
        let secs = i64::from_le_bytes(t.try_into().expect("8 bytes")).rem_euclid(253_402_300_799);
        if let Ok(ts) = jiff::Timestamp::from_second(secs) {
            if let Some(next) = ev.next_after(ts, &jiff::tz::TimeZone::UTC) {
                assert!(next > ts, "{text}: next {next} not after {ts}");
            }
        }
        // The normalised form parses to the same schedule.
        let again = snapblk_policy::CalendarEvent::parse(&ev.to_string()).expect("normalised form parses");
        assert_eq!(again, ev, "{text}");
    }
});
