//! docs/json.md lists, under each reply type, exactly the fields that type serializes.
//!
//! One sample reply per type is parsed *through the typed reply* (`Reply::parse`, as the
//! CLI reads the daemon's answer) and serialized again, so the field list comes from the
//! types: a field a sample names that the type lacks is dropped (or refused), and every
//! field the type writes appears, defaults included. The samples fill every optional
//! field, so optional ones are listed too. `SNAPBLK_BLESS=1` rewrites the generated part.

use serde_json::{json, Value};
use snapblk_control::{Command, Reply};

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/json.md");
const BEGIN: &str = "<!-- BEGIN GENERATED -->";
const END: &str = "<!-- END GENERATED -->";

fn cmd(v: Value) -> Command {
    serde_json::from_value(v).expect("a command")
}

fn repo() -> Value {
    json!({"url": "file:///r", "endpoint": null, "region": null, "secret": ""})
}

fn volume() -> Value {
    json!({"name": "v", "id": 1, "size": 4096, "written": 0, "snapshots": 1,
        "snapshot_bytes": 0, "used": 0, "quota": 8192, "origin": "w@s", "created": 1,
        "open": 0, "incomplete": {"by": "lazy-restore", "backup": "v@s", "manifest": "m",
        "source": "file:///r"}})
}

fn snapshot() -> Value {
    json!({"volume": "v", "name": "s", "id": 2, "size": 4096, "created": 1, "written": 0,
        "exclusive": 0, "parent": "p", "protected": false})
}

fn restore_status() -> Value {
    json!({"volume": "v", "backup": "v@s", "manifest": "m", "target": "file:///r",
        "complete": false, "bytes_done": 1, "bytes_total": 2, "cells_remaining": 1,
        "percent": 50.0, "seconds": 1.0, "error": "e", "ready_seconds": 0.5})
}

fn policy() -> Value {
    json!({"volumes": ["v"], "groups": ["g"], "timezone": "UTC",
        "snapshots": {"schedule": "hourly", "keep": {"daily": 7}, "prefix": "auto",
            "hooks": {"pre": ["true"], "post": ["true"]}},
        "backups": [{"repository": "off", "schedule": "daily", "keep": {"last": 3}}]})
}

fn repo_target() -> Value {
    json!({"url": "s3://b/p", "key_file": "/k", "passphrase_file": "/p", "endpoint": "http://e",
        "region": "r", "gc": {"schedule": "weekly"}, "verify": {"schedule": "monthly"},
        "copy": {"from": "local", "schedule": "daily", "keep": {"last": 1}}})
}

fn run_record() -> Value {
    json!({"start": "2026-01-01T00:00:00Z", "end": "2026-01-01T00:00:01Z", "manual": true,
        "outcome": {"status": "failed", "error": "e"}, "created": ["v@s"], "deleted": [],
        "warnings": ["w"], "skipped": ["x"], "bytes_uploaded": 1, "detail": "d"})
}

fn job() -> Value {
    json!({"name": "snapshots:p", "spec": {"schedule": "hourly", "timezone": "UTC"},
        "state": {"since": "2026-01-01T00:00:00Z", "last_elapse": "2026-01-01T00:00:00Z",
            "last_start": "2026-01-01T00:00:00Z", "last_end": "2026-01-01T00:00:01Z",
            "last_outcome": {"status": "ok"}, "running_since": null, "runs": 1, "failures": 0},
        "next_run": "2026-01-01T01:00:00Z", "running": false, "policy": "p",
        "repository": "off", "history": [run_record()]})
}

/// (type name, a command it answers, a sample reply of that command).
fn samples() -> Vec<(&'static str, Command, Value)> {
    let pool = json!({"uuid": "u", "format_version": 2, "block_size": 4096, "capacity": 1,
        "used": 0, "free": 1, "pending_free": 0, "metadata_size": 0, "volumes": 0,
        "snapshots": 0, "hidden_layers": 0, "reclaim_jobs": 0});
    let mut resized = volume();
    resized["devices"] = json!([{"path": "/dev/ublkb0", "resized": false, "error": "e"}]);
    let mut created = snapshot();
    created["create_micros"] = json!(10);
    vec![
        ("Pool", cmd(json!({"cmd": "pool_info"})), pool),
        (
            "Check",
            cmd(json!({"cmd": "pool_check"})),
            json!({"errors": ["e"], "error_count": 1,
            "volumes": 0, "snapshots": 0, "lineages": 0, "pages": 0, "dead_records": 0,
            "checkpoints": 0, "index_entries": 0, "owned_blocks": 0, "pending_jobs": 0,
            "kept_contents": 0}),
        ),
        (
            "Scrub",
            cmd(json!({"cmd": "pool_scrub"})),
            json!({"layers": 1, "blocks": 1,
            "bytes": 4096, "bad": [{"layer": 1, "lba": 0, "pba": 9, "detail": "crc",
            "affects": ["v"]}]}),
        ),
        (
            "SpaceGuard",
            cmd(json!({"cmd": "space_guard"})),
            json!({"guard":
            {"min_free_percent": 10.0, "target_free_percent": 15.0}, "free": 1,
            "capacity": 2, "free_percent": 50.0, "deletable": [{"volume": "v",
            "snapshot": "s", "policy": "p", "time": "2026-01-01T00:00:00Z"}]}),
        ),
        (
            "Volume",
            cmd(json!({"cmd": "volume_info", "name": "v"})),
            volume(),
        ),
        (
            "Resized",
            cmd(json!({"cmd": "volume_resize", "name": "v", "size": 4096, "force": false})),
            resized,
        ),
        (
            "DefaultVolume",
            cmd(json!({"cmd": "volume_set_default", "name": "v"})),
            json!({"default_volume": "v"}),
        ),
        (
            "Deleted",
            cmd(json!({"cmd": "volume_delete", "name": "v", "recursive": false})),
            json!({"deleted": "v"}),
        ),
        (
            "Snapshot",
            cmd(json!({"cmd": "snapshot_create", "snapshot": "v@s"})),
            created,
        ),
        (
            "SnapshotInfo",
            cmd(json!({"cmd": "snapshot_list", "volume": null})),
            json!([snapshot()]),
        ),
        (
            "GroupSnapshot",
            cmd(json!({"cmd": "snapshot_create", "snapshot": "g@s", "group": true})),
            json!({"group": "g", "snapshots": [snapshot()], "create_micros": 10}),
        ),
        (
            "GroupSet",
            cmd(json!({"cmd": "group_set", "name": "g", "volumes": ["v"]})),
            json!({"group": "g", "volumes": ["v"]}),
        ),
        (
            "Group",
            cmd(json!({"cmd": "group_list"})),
            json!([{"name": "g", "volumes": ["v"]}]),
        ),
        (
            "Diff",
            cmd(json!({"cmd": "diff", "from": "v@a", "to": "v"})),
            json!({"from": "v@a",
            "to": "v", "changed_bytes": 4096, "ranges": [{"offset": 0, "length": 4096}]}),
        ),
        (
            "Device",
            cmd(json!({"cmd": "list"})),
            json!([{"id": 0, "path": "/dev/ublkb0",
            "export": "v", "read_only": false, "requests_direct": 1, "requests_via_api": 0,
            "requests_failed": 0}]),
        ),
        (
            "Backup",
            cmd(json!({"cmd": "backup", "snapshot": "v@s", "repo": repo(), "full": false})),
            json!({"manifest": "m", "volume": "v", "snapshot": "s", "size": 4096, "base": "b",
            "already_stored": false, "stats": {"bytes_read": 1, "bytes_new": 1,
            "bytes_uploaded": 1, "chunks_new": 1, "chunks_reused": 0, "packs": 1,
            "seconds": 0.1, "chunks_compacted": 0, "bytes_compacted": 0}}),
        ),
        (
            "Restore",
            cmd(json!({"cmd": "restore", "repo": repo(), "backup": "v@s", "name": "w"})),
            json!({"manifest": "m", "volume": "v", "snapshot": "s", "pool": "p", "host": "h",
            "size": 4096, "bytes_written": 4096, "bytes_downloaded": 100, "chunks": 1,
            "seconds": 0.1}),
        ),
        (
            "RestoreStatus",
            cmd(json!({"cmd": "restore_status"})),
            json!([restore_status()]),
        ),
        (
            "Cancelled",
            cmd(json!({"cmd": "restore_cancel", "volume": "v"})),
            json!({"cancelled": "v"}),
        ),
        (
            "NamedPolicy",
            cmd(json!({"cmd": "policy_list"})),
            json!([{"name": "p", "policy": policy()}]),
        ),
        (
            "PolicyDetail",
            cmd(json!({"cmd": "policy_show", "name": "p"})),
            json!({"name": "p", "policy": policy(), "jobs": [job()]}),
        ),
        (
            "VolumePlan",
            cmd(json!({"cmd": "policy_plan", "name": "p"})),
            json!([{"volume": "v",
            "verdicts": [{"name": "auto-1", "time": "2026-01-01T00:00:00Z",
            "reasons": ["daily"]}], "error": "e"}]),
        ),
        ("JobInfo", cmd(json!({"cmd": "jobs"})), json!([job()])),
        (
            "RunRecord",
            cmd(json!({"cmd": "job_run", "name": "j"})),
            run_record(),
        ),
        (
            "NamedRepo",
            cmd(json!({"cmd": "repo_list"})),
            json!([{"name": "off", "repository": repo_target()}]),
        ),
        (
            "Protection",
            cmd(json!({"cmd": "status"})),
            json!({"verdict": "at_risk",
            "exit_code": 1, "volumes": [{"volume": "v", "policies": ["p"],
            "verdict": "at_risk", "reasons": ["r"], "copies": 2, "media": 1,
            "off_site": false, "targets": [{"policy": "p", "repository": "off",
            "url": "s3://b", "newest": "v@s", "newest_time": "2026-01-01T00:00:00Z",
            "age_secs": 5, "rpo_secs": 10, "within_rpo": true,
            "medium": {"id": "s3://b", "off_site": true}, "same_medium_as_pool": false,
            "last_verify": "2026-01-01T00:00:00Z", "verify_ok": true,
            "last_error": "e"}]}]}),
        ),
        (
            "NotifyConfig",
            cmd(json!({"cmd": "notify_show"})),
            json!({"webhook": "https://h", "command": "logger"}),
        ),
        (
            "NotifyTested",
            cmd(json!({"cmd": "notify_test"})),
            json!({"delivered": {"event": "test"}}),
        ),
        (
            "BackupsChanged",
            cmd(json!({"cmd": "backups_changed", "url": "file:///r"})),
            json!({"repositories": ["off"], "jobs_updated": ["backup:p:off"]}),
        ),
    ]
}

/// `path type` for every leaf (arrays: their first element; objects: every key).
fn paths(prefix: &str, v: &Value, out: &mut Vec<String>) {
    let kind = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    match v {
        Value::Object(o) if !(prefix.ends_with("delivered")) => {
            for (k, x) in o {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                paths(&p, x, out);
            }
        }
        Value::Array(a) if !a.is_empty() => paths(&format!("{prefix}[]"), &a[0], out),
        other => out.push(format!(
            "`{}` {}",
            if prefix.is_empty() { "[]" } else { prefix },
            kind(other)
        )),
    }
}

fn generated() -> String {
    let mut s = String::new();
    for (name, c, sample) in samples() {
        let r = Reply::parse(&c, sample).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut v = r.to_value();
        // Arrays document their element type.
        if let Value::Array(a) = &v {
            v = a[0].clone();
        }
        let mut p = Vec::new();
        paths("", &v, &mut p);
        s.push_str(&format!("\n### {name}\n\n"));
        for x in p {
            s.push_str(&format!("- {x}\n"));
        }
    }
    s.push('\n');
    s
}

#[test]
fn docs_json_lists_exactly_the_fields_of_each_reply() {
    let doc = std::fs::read_to_string(DOC).expect("docs/json.md");
    let (a, rest) = doc.split_once(BEGIN).expect("no BEGIN marker");
    let (old, b) = rest.split_once(END).expect("no END marker");
    let want = generated();
    if old != want {
        if std::env::var_os("SNAPBLK_BLESS").is_some() {
            std::fs::write(DOC, format!("{a}{BEGIN}{want}{END}{b}")).unwrap();
            return;
        }
        panic!(
            "docs/json.md is stale: its field lists differ from what the reply types serialize; \
             run `SNAPBLK_BLESS=1 cargo test -p snapblk-control --test json_doc` and review the diff"
        );
    }
}

/// What a type leaves out when empty parses back: a snapshot job has no repository.
#[test]
fn replies_parse_back_without_the_fields_they_skip() {
    let mut j = job();
    j.as_object_mut().unwrap().remove("repository");
    let r =
        Reply::parse(&cmd(json!({"cmd": "jobs"})), json!([j])).expect("a job without a repository");
    let again = Reply::parse(&cmd(json!({"cmd": "jobs"})), r.to_value()).expect("round trip");
    assert_eq!(again.to_value(), r.to_value());
    let mut v = volume();
    for k in ["quota", "incomplete", "origin"] {
        v.as_object_mut().unwrap().remove(k);
    }
    Reply::parse(&cmd(json!({"cmd": "volume_list"})), json!([v])).expect("a plain volume");
    let mut s = restore_status();
    for k in [
        "bytes_done",
        "bytes_total",
        "cells_remaining",
        "percent",
        "seconds",
        "ready_seconds",
    ] {
        s.as_object_mut().unwrap().remove(k);
    }
    Reply::parse(&cmd(json!({"cmd": "restore_status"})), json!([s]))
        .expect("an interrupted restore");
}

/// Every command has a reply type (Reply::parse covers the command set: a new command
/// without one does not compile), and a reply of the wrong shape is refused, naming it.
#[test]
fn a_reply_of_the_wrong_shape_is_refused() {
    let e = Reply::parse(&cmd(json!({"cmd": "volume_list"})), json!({"deleted": "v"}))
        .expect_err("a volume list parsed from a deleted reply");
    assert!(e.contains("volume_list"), "{e}");
}
