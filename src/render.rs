//! Human-readable output of command results, per reply type (snapblk_control::Reply; the
//! `--json` output is the reply itself).

use jiff::Timestamp;
use serde::Serialize;
use serde_json::Value;
use snapblk_control::reply::Protection;
use snapblk_control::Reply;
use snapblk_core::keys::Filling;
use snapblk_core::pool::VolumeInfo;
use snapblk_policy::{Keep, Outcome};

use snapblk_control::human::{format_size, format_time};
use snapblk_control::Command;

const SIZE_KEYS: &[&str] = &[
    "size",
    "written",
    "snapshot_bytes",
    "capacity",
    "used",
    "free",
    "pending_free",
    "metadata_size",
    "exclusive",
    "changed_bytes",
    "block_size",
    "quota",
];

/// A cell of the generic key/value listing (sizes and times made human).
fn cell(key: &str, v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Number(n) if SIZE_KEYS.contains(&key) => {
            n.as_u64().map(format_size).unwrap_or_else(|| n.to_string())
        }
        Value::Number(n) if key == "created" => {
            n.as_u64().map(format_time).unwrap_or_else(|| n.to_string())
        }
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .map(|x| cell(key, x))
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

/// Columns padded to their widest cell, headers first.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut grid: Vec<Vec<String>> = vec![headers.iter().map(|h| h.to_string()).collect()];
    grid.extend(rows);
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| grid.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    grid.iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or("-".to_string(), T::to_string)
}

/// Every field of a result, one per line (the generic rendering of a single object).
fn keyvals<T: Serialize>(r: &T) -> String {
    match serde_json::to_value(r) {
        Ok(Value::Object(o)) => o
            .iter()
            .map(|(k, x)| format!("{k:<15} {}", cell(k, x)))
            .collect::<Vec<_>>()
            .join("\n"),
        Ok(v) => v.to_string(),
        Err(e) => format!("(unprintable: {e})"),
    }
}

/// A volume, field by field; an unfinished restore's mark in words.
fn volume(v: &VolumeInfo) -> String {
    let mut plain = v.clone();
    plain.incomplete = None;
    let mut s = keyvals(&plain);
    if let Some(m) = &v.incomplete {
        s.push_str(&format!("\n{:<15} {m}", "incomplete"));
    }
    s
}

/// STATE of a volume row: `incomplete` for a volume whose full restore has not finished,
/// `lazy-restore` while a lazy restore fills it, else `ok`.
fn state(v: &VolumeInfo) -> &'static str {
    match v.incomplete.as_ref().map(|m| m.by) {
        Some(Filling::LazyRestore) => "lazy-restore",
        Some(Filling::FullRestore) => "incomplete",
        None => "ok",
    }
}

/// Whole seconds are enough on a terminal (`--json` keeps the full times).
fn when(t: &Option<Timestamp>) -> String {
    t.map_or("-".to_string(), |t| {
        t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
    })
}

/// A serde enum's name (`daily`, `at_risk`).
fn name_of<T: Serialize>(x: &T) -> String {
    match serde_json::to_value(x) {
        Ok(Value::String(s)) => s,
        Ok(v) => v.to_string(),
        Err(_) => "?".into(),
    }
}

fn keep(k: &Keep) -> String {
    let rules: Vec<String> = [
        ("last", k.last),
        ("hourly", k.hourly),
        ("daily", k.daily),
        ("weekly", k.weekly),
        ("monthly", k.monthly),
        ("yearly", k.yearly),
    ]
    .iter()
    .filter(|(_, n)| *n > 0)
    .map(|(k, n)| format!("{k}={n}"))
    .collect();
    if rules.is_empty() {
        "all".into()
    } else {
        rules.join(",")
    }
}

pub fn render(cmd: &Command, r: &Reply) -> String {
    match r {
        Reply::Volumes(vs) => table(
            &["NAME", "SIZE", "WRITTEN", "SNAPSHOTS", "SNAP-DATA", "USED", "QUOTA", "ORIGIN", "STATE"],
            vs.iter()
                .map(|v| {
                    vec![
                        v.name.clone(),
                        format_size(v.size),
                        format_size(v.written),
                        v.snapshots.to_string(),
                        format_size(v.snapshot_bytes),
                        format_size(v.used),
                        v.quota.map_or("-".into(), format_size),
                        opt(&v.origin),
                        state(v).into(),
                    ]
                })
                .collect(),
        ),
        Reply::Snapshots(ss) => table(
            &["SNAPSHOT", "SIZE", "WRITTEN", "CREATED", "PARENT", "PROTECTED"],
            ss.iter()
                .map(|s| {
                    vec![
                        format!("{}@{}", s.volume, s.name),
                        format_size(s.size),
                        format_size(s.written),
                        format_time(s.created),
                        opt(&s.parent),
                        s.protected.to_string(),
                    ]
                })
                .collect(),
        ),
        Reply::Diff(d) => {
            let mut s = String::new();
            for r in &d.ranges {
                s.push_str(&format!("{}\t{}\n", r.offset, r.length));
            }
            s.push_str(&format!(
                "{} range(s), {} changed",
                d.ranges.len(),
                format_size(d.changed_bytes)
            ));
            s
        }
        Reply::Devices(ds) => table(
            &["DEVICE", "EXPORT", "READ-ONLY", "ID", "DIRECT-IO", "VIA-API", "FAILED"],
            ds.iter()
                .map(|d| {
                    vec![
                        d.path.clone(),
                        d.export.clone(),
                        d.read_only.to_string(),
                        d.id.to_string(),
                        d.requests_direct.to_string(),
                        d.requests_via_api.to_string(),
                        d.requests_failed.to_string(),
                    ]
                })
                .collect(),
        ),
        Reply::Device(d) if matches!(cmd, Command::Detach { .. }) => {
            format!("detached {}", d.path)
        }
        Reply::Device(d) => d.path.clone(),
        Reply::Deleted(d) => format!("deleted {}", d.deleted),
        Reply::Scrub(sc) => {
            let mut s = String::new();
            for b in &sc.bad {
                s.push_str(&format!(
                    "BAD: block {} of layer {} (data block {}): {} (affects: {})\n",
                    b.lba,
                    b.layer,
                    b.pba,
                    b.detail,
                    if b.affects.is_empty() {
                        "nothing visible".into()
                    } else {
                        b.affects.join(", ")
                    }
                ));
            }
            s.push_str(&format!(
                "pool scrub: {} ({} lineages, {} blocks, {} read)",
                if sc.is_clean() {
                    "clean".to_string()
                } else {
                    format!("{} bad block(s)", sc.bad.len())
                },
                sc.layers,
                sc.blocks,
                format_size(sc.bytes)
            ));
            s
        }
        Reply::Check(c) => {
            let mut s = String::new();
            for e in &c.errors {
                s.push_str(&format!("ERROR: {e}\n"));
            }
            if c.error_count > c.errors.len() as u64 {
                s.push_str(&format!(
                    "ERROR: ... and {} more\n",
                    c.error_count - c.errors.len() as u64
                ));
            }
            s.push_str(&format!(
                "pool check: {} ({} volumes, {} snapshots, {} lineages, {} pages, {} dead records, {} data blocks, {} reclaim jobs pending, {} kept snapshot pages)",
                if c.is_clean() {
                    "clean".to_string()
                } else {
                    format!("{} error(s)", c.error_count)
                },
                c.volumes,
                c.snapshots,
                c.lineages,
                c.pages,
                c.dead_records,
                c.owned_blocks,
                c.pending_jobs,
                c.kept_contents
            ));
            s
        }
        Reply::Backup(b) => {
            let name = format!("{}@{}", b.volume, b.snapshot);
            if b.already_stored {
                return format!("{name} is already backed up (backup {})", b.manifest);
            }
            let st = &b.stats;
            format!(
                "backed up {name} as {} ({}): read {}, {} new chunks ({}), uploaded {} in {} packs, {} chunks reused, {:.1} s",
                b.manifest,
                match &b.base {
                    Some(base) => format!("incremental on {}", base.get(..12).unwrap_or(base)),
                    None => "full".into(),
                },
                format_size(st.bytes_read),
                st.chunks_new,
                format_size(st.bytes_new),
                format_size(st.bytes_uploaded),
                st.packs,
                st.chunks_reused,
                st.seconds
            )
        }
        Reply::Restoring(r) => format!(
            "volume {} is ready ({:.2} s); restoring {} lazily in the background (see `snapblk restore-status`)",
            r.volume,
            r.ready_seconds.unwrap_or(0.0),
            r.backup
        ),
        Reply::Restores(rs) => {
            let lines: Vec<String> = rs
                .iter()
                .map(|r| {
                    format!(
                        "{} <- {} ({}): {} {:.1}% of {}{}",
                        r.volume,
                        r.backup,
                        r.target,
                        if r.complete { "complete" } else { "hydrating" },
                        r.percent.unwrap_or(0.0),
                        format_size(r.bytes_total.unwrap_or(0)),
                        match &r.error {
                            Some(e) => format!("; last error: {e}"),
                            None => String::new(),
                        }
                    )
                })
                .collect();
            if lines.is_empty() {
                "no lazy restores".into()
            } else {
                lines.join("\n")
            }
        }
        Reply::Restore(r) => format!(
            "restored {}@{} (backup {} of pool {}, host {}) as volume {}: wrote {}, downloaded {} ({} chunks) in {:.1} s",
            r.volume,
            r.snapshot,
            r.manifest,
            r.pool,
            r.host,
            match cmd {
                Command::Restore { name, .. } => name.as_str(),
                _ => "?",
            },
            format_size(r.bytes_written),
            format_size(r.bytes_downloaded),
            r.chunks,
            r.seconds
        ),
        Reply::Groups(gs) => table(
            &["GROUP", "VOLUMES"],
            gs.iter()
                .map(|g| vec![g.name.clone(), g.volumes.join(" ")])
                .collect(),
        ),
        Reply::Jobs(js) => table(
            &["JOB", "LAST", "LAST START", "NEXT RUN", "RUNS", "FAILED", "ERROR"],
            js.iter()
                .map(|j| {
                    let st = &j.view.state;
                    let (last, error) = match &st.last_outcome {
                        None => ("never", "-".to_string()),
                        Some(Outcome::Ok) => ("ok", "-".into()),
                        Some(Outcome::Failed { error }) => ("failed", error.clone()),
                        Some(Outcome::Interrupted) => ("interrupted", "-".into()),
                    };
                    let status = if j.view.running { "running" } else { last }.to_string();
                    vec![
                        j.view.name.clone(),
                        status,
                        when(&st.last_start),
                        when(&j.view.next_run),
                        st.runs.to_string(),
                        st.failures.to_string(),
                        error,
                    ]
                })
                .collect(),
        ),
        Reply::Policies(ps) => table(
            &["POLICY", "VOLUMES", "GROUPS", "SCHEDULE", "KEEP"],
            ps.iter()
                .map(|n| {
                    let (vols, groups, sched, kept) = match &n.policy {
                        Some(p) => (
                            p.volumes.join(","),
                            p.groups.join(","),
                            p.snapshots
                                .as_ref()
                                .map_or("-".to_string(), |s| s.schedule.to_string()),
                            p.snapshots.as_ref().map_or("all".to_string(), |s| keep(&s.keep)),
                        ),
                        None => ("-".into(), "-".into(), "-".into(), "-".into()),
                    };
                    vec![n.name.clone(), vols, groups, sched, kept]
                })
                .collect(),
        ),
        Reply::Protection(p) => status(p),
        Reply::Repos(rs) => table(
            &["REPOSITORY", "URL", "KEY FILE", "GC", "VERIFY"],
            rs.iter()
                .map(|n| match &n.repository {
                    Some(t) => vec![
                        n.name.clone(),
                        t.url.clone(),
                        opt(&t.key_file.as_ref().or(t.passphrase_file.as_ref())),
                        opt(&t.gc.as_ref().map(|g| g.schedule.to_string())),
                        opt(&t.verify.as_ref().map(|v| v.schedule.to_string())),
                    ],
                    None => vec![n.name.clone(), "-".into(), "-".into(), "-".into(), "-".into()],
                })
                .collect(),
        ),
        Reply::Plan(plans) => plans
            .iter()
            .flat_map(|p| {
                let vol = &p.volume;
                let err = p.error.as_ref().map(|e| format!("error   {vol}: {e}"));
                p.verdicts
                    .iter()
                    .map(move |x| {
                        if x.reasons.is_empty() {
                            format!("delete  {vol}@{}", x.name)
                        } else {
                            let why: Vec<String> = x.reasons.iter().map(name_of).collect();
                            format!("keep    {vol}@{}  ({})", x.name, why.join(", "))
                        }
                    })
                    .chain(err)
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Reply::Volume(v) => volume(v),
        Reply::Resized(r) => {
            let mut s = volume(&r.volume);
            for d in &r.devices {
                s.push_str(&format!(
                    "\n{:<15} {}{}",
                    "device",
                    d.path,
                    match &d.error {
                        Some(e) => format!(" not resized: {e}"),
                        None => " resized".into(),
                    }
                ));
            }
            s
        }
        Reply::Pool(x) => keyvals(x),
        Reply::DefaultVolume(x) => keyvals(x),
        Reply::Snapshot(x) => keyvals(x),
        Reply::GroupSnapshot(x) => keyvals(x),
        Reply::GroupSet(x) => keyvals(x),
        Reply::Cancelled(x) => keyvals(x),
        Reply::Policy(x) => keyvals(x),
        Reply::PolicyDetail(x) => keyvals(x),
        Reply::Run(x) => keyvals(x),
        Reply::Repo(x) => keyvals(x),
        Reply::Notify(x) => keyvals(x),
        Reply::NotifyTested(x) => keyvals(x),
        Reply::SpaceGuard(x) => keyvals(x),
        Reply::BackupsChanged(x) => keyvals(x),
    }
}

/// `snapblk status`: one line per volume, then each target and every reason.
fn status(p: &Protection) -> String {
    let mut out = table(
        &[
            "VOLUME", "STATUS", "COPIES", "MEDIA", "OFF-SITE", "POLICIES",
        ],
        p.volumes
            .iter()
            .map(|s| {
                vec![
                    s.volume.clone(),
                    name_of(&s.verdict).replace('_', " "),
                    s.copies.to_string(),
                    s.media.to_string(),
                    if s.off_site { "yes" } else { "no" }.into(),
                    s.policies.join(","),
                ]
            })
            .collect(),
    );
    for s in &p.volumes {
        let vol = &s.volume;
        for t in &s.targets {
            let age = t.age_secs.map_or("never".to_string(), |a| {
                format!("{} ago", snapblk_policy::status::span(a))
            });
            out.push_str(&format!(
                "\n  {vol} -> {}: newest {} ({age}, RPO {}), {}{}",
                t.repository,
                t.newest.as_deref().unwrap_or("-"),
                snapblk_policy::status::span(t.rpo_secs),
                t.medium.id,
                if t.medium.off_site { ", off site" } else { "" },
            ));
        }
        for r in &s.reasons {
            out.push_str(&format!("\n  {vol}: {r}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(1_700_000_000), "2023-11-14 22:13:20 UTC");
    }
}
