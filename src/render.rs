//! Human-readable output of command results (the `--json` output is the raw result).

use serde_json::Value;

use crate::admin::Command;
use crate::human::format_size;

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

fn table(rows: &[Value], cols: &[(&str, &str)]) -> String {
    let mut grid: Vec<Vec<String>> = vec![cols.iter().map(|(_, h)| h.to_string()).collect()];
    for r in rows {
        grid.push(
            cols.iter()
                .map(|(k, _)| {
                    if *k == "vol@snap" {
                        format!("{}@{}", cell("", &r["volume"]), cell("", &r["name"]))
                    } else {
                        cell(k, &r[*k])
                    }
                })
                .collect(),
        );
    }
    let widths: Vec<usize> = (0..cols.len())
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

/// The `incomplete` mark of a volume, in words.
fn incomplete(m: &Value) -> String {
    let how = match m["by"].as_str() {
        Some("lazy-restore") => "lazy restore",
        _ => "full restore",
    };
    format!(
        "{how} of {} ({}) from {} has not finished",
        cell("", &m["backup"]),
        cell("", &m["manifest"]),
        cell("", &m["source"])
    )
}

fn keyvals(v: &Value) -> String {
    match v.as_object() {
        Some(o) => o
            .iter()
            .map(|(k, x)| match k.as_str() {
                "incomplete" => format!("{k:<15} {}", incomplete(x)),
                _ => format!("{k:<15} {}", cell(k, x)),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        None => v.to_string(),
    }
}

/// Adds a STATE cell to volume rows: `incomplete` for a volume whose full restore has
/// not finished, `lazy-restore` while a lazy restore fills it (its `incomplete` field says
/// which backup; `volume info` shows it), else `ok`.
fn with_state(mut rows: Vec<Value>) -> Vec<Value> {
    for r in &mut rows {
        let state = match r
            .get("incomplete")
            .and_then(|m| m.get("by"))
            .and_then(Value::as_str)
        {
            Some("lazy-restore") => "lazy-restore",
            Some(_) => "incomplete",
            None => "ok",
        };
        if let Some(o) = r.as_object_mut() {
            o.insert("state".into(), Value::String(state.into()));
        }
    }
    rows
}

pub fn render(cmd: &Command, v: &Value) -> String {
    let rows = v.as_array().cloned().unwrap_or_default();
    match cmd {
        Command::VolumeList => table(
            &with_state(rows),
            &[
                ("name", "NAME"),
                ("size", "SIZE"),
                ("written", "WRITTEN"),
                ("snapshots", "SNAPSHOTS"),
                ("snapshot_bytes", "SNAP-DATA"),
                ("used", "USED"),
                ("quota", "QUOTA"),
                ("origin", "ORIGIN"),
                ("state", "STATE"),
            ],
        ),
        Command::SnapshotList { .. } => table(
            &rows,
            &[
                ("vol@snap", "SNAPSHOT"),
                ("size", "SIZE"),
                ("written", "WRITTEN"),
                ("created", "CREATED"),
                ("parent", "PARENT"),
                ("protected", "PROTECTED"),
            ],
        ),
        Command::Diff { .. } => {
            let ranges = v["ranges"].as_array().cloned().unwrap_or_default();
            let mut s = String::new();
            for r in &ranges {
                s.push_str(&format!("{}\t{}\n", r["offset"], r["length"]));
            }
            s.push_str(&format!(
                "{} range(s), {} changed",
                ranges.len(),
                format_size(v["changed_bytes"].as_u64().unwrap_or(0))
            ));
            s
        }
        Command::List => table(
            &rows,
            &[
                ("path", "DEVICE"),
                ("export", "EXPORT"),
                ("read_only", "READ-ONLY"),
                ("id", "ID"),
                ("requests_direct", "DIRECT-IO"),
                ("requests_via_api", "VIA-API"),
                ("requests_failed", "FAILED"),
            ],
        ),
        Command::Attach { .. } => cell("", &v["path"]),
        Command::Detach { .. } => format!("detached {}", cell("", &v["path"])),
        Command::VolumeDelete { .. } | Command::SnapshotDelete { .. } => {
            format!("deleted {}", cell("", &v["deleted"]))
        }
        Command::PoolScrub => {
            let bad = v["bad"].as_array().cloned().unwrap_or_default();
            let mut s = String::new();
            for b in &bad {
                let affects: Vec<String> = b["affects"]
                    .as_array()
                    .map(|a| a.iter().map(|x| cell("", x)).collect())
                    .unwrap_or_default();
                s.push_str(&format!(
                    "BAD: block {} of layer {} (data block {}): {} (affects: {})\n",
                    b["lba"], b["layer"], b["pba"], cell("", &b["detail"]),
                    if affects.is_empty() { "nothing visible".into() } else { affects.join(", ") }
                ));
            }
            s.push_str(&format!(
                "pool scrub: {} ({} lineages, {} blocks, {} read)",
                if bad.is_empty() { "clean".to_string() } else { format!("{} bad block(s)", bad.len()) },
                v["layers"], v["blocks"], format_size(v["bytes"].as_u64().unwrap_or(0))
            ));
            s
        }
        Command::PoolCheck => {
            let errors = v["errors"].as_array().cloned().unwrap_or_default();
            let notes = v["notes"].as_array().cloned().unwrap_or_default();
            let mut s = String::new();
            for e in &errors {
                s.push_str(&format!("ERROR: {}\n", cell("", e)));
            }
            for n in &notes {
                s.push_str(&format!("note: {}\n", cell("", n)));
            }
            s.push_str(&format!(
                "pool check: {} ({} volumes, {} snapshots, {} lineages, {} pages, {} dead records, {} data blocks, {} reclaim jobs pending)",
                if errors.is_empty() { "clean".to_string() } else { format!("{} error(s)", v["error_count"]) },
                v["volumes"], v["snapshots"], v["lineages"], v["pages"], v["dead_records"], v["owned_blocks"], v["pending_jobs"]
            ));
            s
        }
        Command::Backup { .. } => {
            let st = &v["stats"];
            let u = |k: &str| st[k].as_u64().unwrap_or(0);
            if v["already_stored"].as_bool() == Some(true) {
                return format!("{} is already backed up (backup {})", v_name(v), cell("", &v["manifest"]));
            }
            format!(
                "backed up {} as {} ({}): read {}, {} new chunks ({}), uploaded {} in {} packs, {} chunks reused, {:.1} s",
                v_name(v),
                cell("", &v["manifest"]),
                match v["base"].as_str() {
                    Some(b) => format!("incremental on {}", b.get(..12).unwrap_or(b)),
                    None => "full".into(),
                },
                format_size(u("bytes_read")),
                u("chunks_new"),
                format_size(u("bytes_new")),
                format_size(u("bytes_uploaded")),
                u("packs"),
                u("chunks_reused"),
                st["seconds"].as_f64().unwrap_or(0.0)
            )
        }
        Command::Restore { lazy: true, name, .. } => format!(
            "volume {name} is ready ({:.2} s); restoring {} lazily in the background (see `snapblk restore-status`)",
            v["ready_seconds"].as_f64().unwrap_or(0.0),
            cell("", &v["backup"])
        ),
        Command::RestoreStatus => {
            let mut s = String::new();
            for r in &rows {
                s.push_str(&format!(
                    "{} <- {} ({}): {} {:.1}% of {}{}\n",
                    cell("", &r["volume"]),
                    cell("", &r["backup"]),
                    cell("", &r["target"]),
                    if r["complete"].as_bool() == Some(true) { "complete" } else { "hydrating" },
                    r["percent"].as_f64().unwrap_or(0.0),
                    format_size(r["bytes_total"].as_u64().unwrap_or(0)),
                    match r["error"].as_str() {
                        Some(e) => format!("; last error: {e}"),
                        None => String::new(),
                    }
                ));
            }
            if s.is_empty() {
                "no lazy restores".into()
            } else {
                s.trim_end().to_string()
            }
        }
        Command::Restore { name, .. } => format!(
            "restored {} (backup {} of pool {}, host {}) as volume {name}: wrote {}, downloaded {} ({} chunks) in {:.1} s",
            v_name(v),
            cell("", &v["manifest"]),
            cell("", &v["pool"]),
            cell("", &v["host"]),
            format_size(v["bytes_written"].as_u64().unwrap_or(0)),
            format_size(v["bytes_downloaded"].as_u64().unwrap_or(0)),
            v["chunks"],
            v["seconds"].as_f64().unwrap_or(0.0)
        ),
        Command::GroupList => table(
            &rows
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "name": r["name"],
                        "volumes": r["volumes"].as_array().map(|a| a.iter().map(|v| cell("", v)).collect::<Vec<_>>().join(" ")),
                    })
                })
                .collect::<Vec<_>>(),
            &[("name", "GROUP"), ("volumes", "VOLUMES")],
        ),
        Command::Jobs => table(&job_rows(&rows), &[
            ("name", "JOB"),
            ("status", "LAST"),
            ("last_start", "LAST START"),
            ("next_run", "NEXT RUN"),
            ("runs", "RUNS"),
            ("failures", "FAILED"),
            ("error", "ERROR"),
        ]),
        Command::PolicyList => table(
            &rows
                .iter()
                .map(|r| {
                    let s = &r["policy"]["snapshots"];
                    let keep = s["keep"]
                        .as_object()
                        .map(|k| {
                            k.iter()
                                .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
                                .map(|(k, n)| format!("{k}={n}"))
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    serde_json::json!({
                        "name": r["name"],
                        "volumes": r["policy"]["volumes"].as_array().map(|a| a.iter().map(|v| cell("", v)).collect::<Vec<_>>().join(",")),
                        "groups": r["policy"]["groups"].as_array().map(|a| a.iter().map(|v| cell("", v)).collect::<Vec<_>>().join(",")),
                        "schedule": s["schedule"],
                        "keep": if keep.is_empty() { "all".to_string() } else { keep },
                    })
                })
                .collect::<Vec<_>>(),
            &[
                ("name", "POLICY"),
                ("volumes", "VOLUMES"),
                ("groups", "GROUPS"),
                ("schedule", "SCHEDULE"),
                ("keep", "KEEP"),
            ],
        ),
        Command::Status { .. } => status(v),
        Command::RepoList => table(
            &rows
                .iter()
                .map(|r| {
                    let t = &r["repository"];
                    let sched = |k: &str| {
                        t[k]["schedule"]
                            .as_str()
                            .map_or("-".to_string(), str::to_string)
                    };
                    serde_json::json!({
                        "name": r["name"],
                        "url": t["url"],
                        "key": t["key_file"].as_str().or(t["passphrase_file"].as_str()),
                        "gc": sched("gc"),
                        "verify": sched("verify"),
                    })
                })
                .collect::<Vec<_>>(),
            &[
                ("name", "REPOSITORY"),
                ("url", "URL"),
                ("key", "KEY FILE"),
                ("gc", "GC"),
                ("verify", "VERIFY"),
            ],
        ),
        Command::PolicyPlan { .. } => rows
            .iter()
            .flat_map(|p| {
                let vol = cell("", &p["volume"]);
                let err = p["error"]
                    .as_str()
                    .map(|e| format!("error   {vol}: {e}"));
                p["verdicts"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |x| {
                        let reasons: Vec<String> = x["reasons"]
                            .as_array()
                            .map(|a| a.iter().map(|r| cell("", r)).collect())
                            .unwrap_or_default();
                        if reasons.is_empty() {
                            format!("delete  {vol}@{}", cell("", &x["name"]))
                        } else {
                            format!("keep    {vol}@{}  ({})", cell("", &x["name"]), reasons.join(", "))
                        }
                    })
                    .chain(err)
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => keyvals(v),
    }
}

/// `snapblk status`: one line per volume, then each target and every reason.
fn status(v: &Value) -> String {
    let vols = v["volumes"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Value> = vols
        .iter()
        .map(|s| {
            serde_json::json!({
                "volume": s["volume"],
                "verdict": cell("", &s["verdict"]).replace('_', " "),
                "copies": s["copies"],
                "media": s["media"],
                "off_site": if s["off_site"].as_bool() == Some(true) { "yes" } else { "no" },
                "policies": s["policies"].as_array().map(|a| a.iter().map(|p| cell("", p)).collect::<Vec<_>>().join(",")),
            })
        })
        .collect();
    let mut out = table(
        &rows,
        &[
            ("volume", "VOLUME"),
            ("verdict", "STATUS"),
            ("copies", "COPIES"),
            ("media", "MEDIA"),
            ("off_site", "OFF-SITE"),
            ("policies", "POLICIES"),
        ],
    );
    for s in &vols {
        let vol = cell("", &s["volume"]);
        for t in s["targets"].as_array().cloned().unwrap_or_default() {
            let age = t["age_secs"].as_u64().map_or("never".to_string(), |a| {
                format!("{} ago", snapblk_policy::status::span(a))
            });
            out.push_str(&format!(
                "\n  {vol} -> {}: newest {} ({age}, RPO {}), {}{}",
                cell("", &t["repository"]),
                t["newest"].as_str().unwrap_or("-"),
                snapblk_policy::status::span(t["rpo_secs"].as_u64().unwrap_or(0)),
                cell("", &t["medium"]["id"]),
                if t["medium"]["off_site"].as_bool() == Some(true) {
                    ", off site"
                } else {
                    ""
                },
            ));
        }
        for r in s["reasons"].as_array().cloned().unwrap_or_default() {
            out.push_str(&format!("\n  {vol}: {}", cell("", &r)));
        }
    }
    out
}

/// One row per job for `snapblk jobs`.
fn job_rows(rows: &[Value]) -> Vec<Value> {
    rows.iter()
        .map(|j| {
            let st = &j["state"];
            let last = &st["last_outcome"];
            let status = if j["running"].as_bool() == Some(true) {
                "running".to_string()
            } else {
                last["status"].as_str().unwrap_or("never").to_string()
            };
            // Whole seconds are enough on a terminal (`--json` keeps the full times).
            let secs = |v: &Value| match v.as_str() {
                Some(t) => Value::String(match t.split_once('.') {
                    Some((s, _)) => format!("{s}Z"),
                    None => t.to_string(),
                }),
                None => v.clone(),
            };
            serde_json::json!({
                "name": j["name"],
                "status": status,
                "last_start": secs(&st["last_start"]),
                "next_run": secs(&j["next_run"]),
                "runs": st["runs"],
                "failures": st["failures"],
                "error": last["error"],
            })
        })
        .collect()
}

fn v_name(v: &Value) -> String {
    format!("{}@{}", cell("", &v["volume"]), cell("", &v["snapshot"]))
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
