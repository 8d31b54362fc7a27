//! Repository commands that need no pool: `repo init`, `backup list|verify|prune|gc`.
//! They run in the CLI process itself. Each returns its JSON result, the human rendering
//! and whether it found the repository healthy (exit status 1 otherwise).

use anyhow::Result;
use serde_json::{json, Value};
use snapblk_backup::catalog::Catalogs;
use snapblk_backup::repo::InitOptions;
use snapblk_backup::{gc, prune, verify, Progress};

use crate::cli::{BackupCmd, GcArgs, RepoCmd};
use snapblk_control::human::format_time;
use snapblk_control::human::{format_size, parse_duration, parse_size};
use snapblk_daemon::policies::gc_text;
use snapblk_daemon::repos::RepoOpen;

pub struct Outcome {
    pub json: Value,
    pub text: String,
    pub ok: bool,
}

fn fits_u32(what: &str, v: u64) -> Result<u32> {
    u32::try_from(v).map_err(|_| anyhow::anyhow!("{what} {v} is too large"))
}

pub fn repo(cmd: &RepoCmd) -> Result<Outcome> {
    let (target, chunk_size, pack_size, repo) = match cmd {
        RepoCmd::Init {
            target,
            chunk_size,
            pack_size,
            repo,
        } => (target, chunk_size, pack_size, repo),
        RepoCmd::Repair {
            target,
            dry_run,
            repo,
        } => {
            let r = repo.spec(target)?.open()?;
            let rep = snapblk_backup::repair::run(&r, *dry_run)?;
            let verb = if rep.dry_run { "would be" } else { "were" };
            let mut text = format!(
                "{} packs, {} indexes: {} indexes {verb} rebuilt from their packs, {} {verb} removed (pack gone)",
                rep.packs,
                rep.indexes,
                rep.indexes_rebuilt.len(),
                rep.indexes_removed.len()
            );
            for (p, why) in &rep.packs_unreadable {
                text.push_str(&format!(
                    "\n  pack {p} has no index and cannot be read: {why}"
                ));
            }
            for (b, n) in &rep.backups_damaged {
                text.push_str(&format!(
                    "\n  backup {b} references {n} chunks no pack holds: it cannot be restored; back it up again"
                ));
            }
            return Ok(Outcome {
                ok: rep.is_clean(),
                json: serde_json::to_value(&rep)?,
                text,
            });
        }
        RepoCmd::Add(_) | RepoCmd::List | RepoCmd::Remove { .. } => {
            anyhow::bail!("registered repositories are kept by the pool: run this with the daemon or --meta/--data")
        }
        RepoCmd::Upgrade { target, repo } => {
            let r = repo.spec(target)?.upgrade()?;
            let c = r.config();
            return Ok(Outcome {
                json: json!({ "target": target, "id": c.id, "version": c.version }),
                text: format!(
                    "repository {} at {target} is format {} (config authenticated, backups catalogued, new tables written in frames; an older snapblk refuses it, so every host sharing it needs this version)",
                    c.id, c.version
                ),
                ok: true,
            });
        }
    };
    let opts = InitOptions {
        chunk_size: fits_u32("chunk size", parse_size(chunk_size)?)?,
        pack_size: fits_u32("pack size", parse_size(pack_size)?)?,
        ..Default::default()
    };
    let r = repo.spec(target)?.init(&opts)?;
    let c = r.config();
    Ok(Outcome {
        json: json!({ "target": target, "id": c.id, "chunk_size": c.chunk_size,
            "pack_size": c.pack_size, "version": c.version }),
        text: format!(
            "created repository {} at {target} (chunks {}, packs {}, zstd, XChaCha20-Poly1305)",
            c.id,
            format_size(u64::from(c.chunk_size)),
            format_size(u64::from(c.pack_size))
        ),
        ok: true,
    })
}

pub fn gc_opts(g: &GcArgs, dry_run: bool) -> Result<gc::Options> {
    if !(0.0..=100.0).contains(&g.max_unused) {
        anyhow::bail!("--max-unused {} is not a percentage (0-100)", g.max_unused);
    }
    Ok(gc::Options {
        grace_secs: parse_duration(&g.grace)?,
        max_unused: g.max_unused / 100.0,
        dry_run,
    })
}

pub fn backup(cmd: &BackupCmd, progress: &dyn Progress) -> Result<Outcome> {
    match cmd {
        BackupCmd::Copy {
            source,
            dest,
            from,
            volume,
            dest_key_file,
            dest_passphrase_file,
            dest_endpoint,
            repo,
        } => {
            let src = repo.spec(source)?.open()?;
            let mut d = repo.clone();
            if dest_key_file.is_some() || dest_passphrase_file.is_some() {
                d.key_file = dest_key_file.clone();
                d.passphrase_file = dest_passphrase_file.clone();
            }
            if dest_endpoint.is_some() {
                d.endpoint = dest_endpoint.clone();
            }
            let dst = d.spec(dest)?.open()?;
            let out = snapblk_backup::copy::run(
                &src,
                &dst,
                from.as_deref(),
                volume.as_deref(),
                progress,
            )?;
            let copied = out.iter().filter(|c| !c.summary.already_stored).count();
            let bytes: u64 = out.iter().map(|c| c.summary.stats.bytes_uploaded).sum();
            let mut text = format!(
                "copied {copied} backups ({} uploaded); {} were there already",
                format_size(bytes),
                out.len() - copied
            );
            for c in out.iter().filter(|c| !c.summary.already_stored) {
                text.push_str(&format!(
                    "\n  + {} (pool {}){}",
                    c.backup,
                    c.pool,
                    if c.summary.base.is_some() {
                        ", incremental"
                    } else {
                        ""
                    }
                ));
            }
            Ok(Outcome {
                json: json!({ "copied": out }),
                text,
                ok: true,
            })
        }
        BackupCmd::List { target, from, repo } => {
            list(&repo.spec(target)?.open()?, from.as_deref())
        }
        BackupCmd::Verify {
            target,
            read_data,
            repo,
        } => {
            let r = repo.spec(target)?.open()?;
            let rep = verify::run(&r, *read_data, r.parallelism().downloads, progress)?;
            let mut text = format!(
                "verified {} backups, {} chunks{}: {}",
                rep.manifests,
                rep.chunks,
                if *read_data {
                    format!(
                        ", read {} from {} packs",
                        format_size(rep.bytes_read),
                        rep.packs
                    )
                } else {
                    String::new()
                },
                if rep.is_clean() {
                    "no problems"
                } else {
                    "PROBLEMS FOUND"
                }
            );
            for c in &rep.catalogs {
                text.push_str(&format!(
                    "\n  catalog of pool {}: generation {} ({}), written {} by {}, {} backups",
                    c.pool,
                    c.generation,
                    c.hash.get(..16).unwrap_or(&c.hash),
                    format_time(c.written),
                    if c.host.is_empty() { "?" } else { &c.host },
                    c.backups
                ));
            }
            if rep.leftovers > 0 {
                text.push_str(&format!(
                    "\n  {} headers of removed backups are left over (gc deletes them)",
                    rep.leftovers
                ));
            }
            for p in &rep.problems {
                text.push_str(&format!(
                    "\n  {}: {} (affects: {})",
                    p.object,
                    p.detail,
                    if p.affects.is_empty() {
                        "no backup".into()
                    } else {
                        p.affects.join(", ")
                    }
                ));
            }
            Ok(Outcome {
                ok: rep.is_clean(),
                json: serde_json::to_value(&rep)?,
                text,
            })
        }
        BackupCmd::Prune {
            target,
            keep_last,
            keep_daily,
            keep_weekly,
            keep_monthly,
            from,
            all_pools,
            dry_run,
            no_gc,
            gc: g,
            repo,
        } => {
            let r = repo.spec(target)?.open()?;
            let policy = prune::Policy {
                keep_last: *keep_last,
                keep_daily: *keep_daily,
                keep_weekly: *keep_weekly,
                keep_monthly: *keep_monthly,
            };
            let scope = prune::Scope {
                from: from.clone(),
                all_pools: *all_pools,
            };
            let out = prune::run(&r, &policy, &scope, *dry_run)?;
            let mut text = format!(
                "{} {} backups, kept {}",
                if *dry_run { "would remove" } else { "removed" },
                out.removed.len(),
                out.kept.len()
            );
            for x in &out.removed {
                text.push_str(&format!("\n  - {x}"));
            }
            for x in &out.held {
                text.push_str(&format!("\n  kept {x}"));
            }
            let gc_rep = if *no_gc {
                None
            } else {
                let rep = gc::run(&r, &gc_opts(g, *dry_run)?, progress)?;
                text.push('\n');
                text.push_str(&gc_text(&rep));
                Some(rep)
            };
            Ok(Outcome {
                json: json!({ "prune": out, "gc": gc_rep }),
                text,
                ok: true,
            })
        }
        BackupCmd::Forget {
            target,
            backups,
            from,
            force,
            repo,
        } => {
            let r = repo.spec(target)?.open()?;
            let on_hold = if *force {
                prune::OnHold::Ignore
            } else {
                prune::OnHold::Refuse
            };
            let gone: Vec<String> = prune::forget(&r, backups, from.as_deref(), on_hold)?
                .iter()
                .map(|h| format!("{} ({})", h.name(), h.id))
                .collect();
            let mut text = format!("forgot {} backups (gc frees their data)", gone.len());
            for g in &gone {
                text.push_str(&format!("\n  - {g}"));
            }
            Ok(Outcome {
                json: json!({ "forgotten": gone }),
                text,
                ok: true,
            })
        }
        BackupCmd::Gc {
            target,
            dry_run,
            gc: g,
            repo,
        } => {
            let r = repo.spec(target)?.open()?;
            let rep = gc::run(&r, &gc_opts(g, *dry_run)?, progress)?;
            Ok(Outcome {
                text: gc_text(&rep),
                json: serde_json::to_value(&rep)?,
                ok: true,
            })
        }
    }
}

fn list(r: &snapblk_backup::Repository, from: Option<&str>) -> Result<Outcome> {
    let catalogs = Catalogs::load(r)?;
    let pools: Vec<&str> = match from {
        Some(f) => catalogs.pools_named(f),
        None => catalogs.pools.keys().map(String::as_str).collect(),
    };
    if let (Some(f), true) = (from, pools.is_empty()) {
        anyhow::bail!("--from {f} names no pool or host that has backups in this repository");
    }
    let headers: Vec<_> = catalogs
        .headers()
        .into_iter()
        .filter(|h| pools.contains(&h.pool.as_str()))
        .collect();
    // Format 5: the view's LISTs (trash, gen, ix/ since the last gc), not packs/ whole.
    let (packs, stored) = snapblk_backup::index::Listing::for_job(r)?.stored();
    let logical: u64 = headers.iter().map(|h| h.stored_bytes).sum();
    let ratio = if stored == 0 {
        0.0
    } else {
        logical as f64 / stored as f64
    };
    let mut text = format!(
        "{:<32} {:<12} {:<16} {:<23} {:>10} {:>10} {:>10}  {}\n",
        "BACKUP", "ID", "HOST", "SNAPSHOT TAKEN", "SIZE", "DATA", "UPLOADED", "BASE"
    );
    for h in &headers {
        let base = h
            .base
            .as_deref()
            .map_or("-".to_string(), |b| b.get(..12).unwrap_or(b).to_string());
        text.push_str(&format!(
            "{:<32} {:<12} {:<16} {:<23} {:>10} {:>10} {:>10}  {}\n",
            h.name(),
            h.id.get(..12).unwrap_or(&h.id),
            if h.host.is_empty() { "?" } else { &h.host },
            format_time(h.created),
            format_size(h.size),
            format_size(h.stored_bytes),
            format_size(h.stats.bytes_uploaded),
            base
        ));
    }
    text.push_str(&format!(
        "{} backups, {} of snapshot data in {} packs ({}): {:.2}x after dedup and compression",
        headers.len(),
        format_size(logical),
        packs,
        format_size(stored),
        ratio
    ));
    let json = json!({
        "backups": headers,
        "packs": packs,
        "stored_bytes": stored,
        "logical_bytes": logical,
        "dedup_ratio": ratio,
    });
    Ok(Outcome {
        json,
        text,
        ok: true,
    })
}
