//! `berth image …` commands.

use super::Ctx;
use crate::image::import;
use crate::image::progress::{Progress, short_digest};
use crate::image::pull::Puller;
use crate::image::push;
use crate::manifest::units::human_bytes;
use crate::registry::client::RegistryClient;
use crate::registry::reference::Reference;
use crate::state::ContainerRecord;
use crate::store::unpack::UnpackOptions;
use crate::store::{Store, StoreError, StoredImage};
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Build an image from a Containerfile (Dockerfile) with berth's own runtime: each RUN
    /// in a temporary container (network none unless --network host), each COPY/ADD a
    /// layer; unchanged steps come from the cache. The result is tagged REF in the store,
    /// ready for `berth image push` or a manifest's `image`.
    Build {
        /// The build context: the directory COPY and ADD read from (`.dockerignore` applies).
        context: PathBuf,
        /// The reference to tag the result with, e.g. 127.0.0.1:5000/app:1.
        #[arg(short = 't', long = "tag", value_name = "REF")]
        tag: String,
        /// The Containerfile (default CONTEXT/Containerfile, else CONTEXT/Dockerfile).
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: Option<PathBuf>,
        /// A build argument (ARG), repeatable: --build-arg VERSION=1.2.
        #[arg(long = "build-arg", value_name = "K=V")]
        build_args: Vec<String>,
        /// Where RUN steps may connect: none (default), host, or a network berth created
        /// (declared in the manifests and applied).
        #[arg(long, default_value = "none", value_name = "NETWORK")]
        network: String,
        /// Run every step again, reusing no cached layer.
        #[arg(long)]
        no_cache: bool,
        /// Only the image digest on stdout (no step lines, no RUN output).
        #[arg(short, long)]
        quiet: bool,
        /// The result as JSON: reference, digest, each step (cached or not, its layer).
        #[arg(long)]
        json: bool,
    },
    /// Download an image from its registry into the store (layers in parallel, unpacked as
    /// they arrive, every blob verified).
    Pull {
        /// Image reference, e.g. busybox, 127.0.0.1:5000/app:1, name@sha256:….
        reference: String,
        /// No progress output.
        #[arg(short, long)]
        quiet: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the images in the store.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show an image as JSON: digest, config, layers, size, tags.
    Inspect { reference: String },
    /// Give an image in the store another reference.
    Tag { source: String, target: String },
    /// Remove a reference; the image goes when no reference is left. Refused while a
    /// container uses it.
    Rm { reference: String },
    /// Upload an image from the store to its registry.
    Push {
        reference: String,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Import an OCI image layout (directory or tar) or a `docker save` archive.
    Import {
        file: PathBuf,
        /// Reference to give the image (needed when the archive does not name it).
        #[arg(long)]
        tag: Option<String>,
    },
    /// Remove images and layers that no existing container (and, with --manifests, no
    /// declared container) uses; reports the bytes freed.
    Prune {
        /// Also keep the images declared in this manifest directory.
        #[arg(long)]
        manifests: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

pub fn store(c: &Ctx) -> Store {
    crate::reconcile::store(&c.state, &c.config)
}

pub fn unpack_options(c: &Ctx) -> UnpackOptions {
    crate::reconcile::unpack_options(&c.state, &c.config)
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn parse_ref(s: &str) -> Result<Reference> {
    s.parse::<Reference>().map_err(anyhow::Error::msg)
}

/// Find an image by what the user typed: a reference (normalised) or a digest (prefix).
pub fn find(store: &Store, s: &str) -> Result<StoredImage> {
    let is_digest =
        s.starts_with("sha256:") || (s.len() >= 12 && s.chars().all(|c| c.is_ascii_hexdigit()));
    let key = match s.parse::<Reference>() {
        Ok(r) if !is_digest => r.to_string(),
        _ => s.to_string(),
    };
    store.get(&key).map_err(|e| match e {
        StoreError::NotFound(_) => {
            anyhow::anyhow!("image {s} is not in the store (berth image ls lists what is)")
        }
        other => other.into(),
    })
}

pub fn puller(c: &Ctx, quiet: bool) -> Result<Puller> {
    Ok(Puller {
        client: Arc::new(RegistryClient::new(&c.config)?),
        store: store(c),
        concurrency: c.config.pull.concurrency,
        progress: Progress::auto(quiet),
        unpack: unpack_options(c),
    })
}

fn containers(c: &Ctx) -> Result<BTreeMap<String, ContainerRecord>> {
    Ok(c.state
        .read_records(crate::manifest::spec::Kind::Container)?)
}

pub fn run(c: &Ctx, cmd: ImageCommand) -> Result<ExitCode> {
    let st = store(c);
    match cmd {
        ImageCommand::Pull {
            reference,
            quiet,
            json,
        } => {
            let r = parse_ref(&reference)?;
            let p = puller(c, quiet || json)?;
            let out = runtime()?.block_on(p.pull(&r))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else if !quiet {
                println!(
                    "{}: {} ({} layers, {} already present, {} downloaded)",
                    out.reference,
                    out.digest,
                    out.layers,
                    out.reused,
                    human_bytes(out.downloaded)
                );
            }
        }
        ImageCommand::Ls { json } => {
            let mut rows = vec![];
            for (r, d) in st.references()? {
                match st.load(&r, &d) {
                    Ok(img) => rows.push(serde_json::json!({
                        "reference": r, "digest": d.digest, "size": st.image_size(&img),
                        "created": img.config.created, "layers": img.manifest.layers.len(),
                    })),
                    Err(e) => rows.push(serde_json::json!({"reference": r, "digest": d.digest, "error": e.to_string()})),
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<50} {:<14} {:>10}  CREATED",
                    "REFERENCE", "DIGEST", "SIZE"
                );
                for r in &rows {
                    println!(
                        "{:<50} {:<14} {:>10}  {}",
                        r["reference"].as_str().unwrap_or(""),
                        short_digest(r["digest"].as_str().unwrap_or("")),
                        r["size"]
                            .as_u64()
                            .map(human_bytes)
                            .unwrap_or_else(|| "?".into()),
                        r["created"].as_str().unwrap_or("-")
                    );
                }
            }
        }
        ImageCommand::Inspect { reference } => {
            let img = find(&st, &reference)?;
            let tags: Vec<String> = st
                .references()?
                .into_iter()
                .filter(|(_, d)| d.digest == img.digest())
                .map(|(r, _)| r)
                .collect();
            let config: serde_json::Value =
                serde_json::from_slice(&st.read_blob(&img.manifest.config.digest)?)?;
            let chains = img.chain_ids();
            let layers: Vec<_> = img
                .manifest
                .layers
                .iter()
                .zip(&img.config.rootfs.diff_ids)
                .zip(&chains)
                .map(|((l, d), c)| {
                    serde_json::json!({"digest": l.digest, "size": l.size, "media_type": l.media_type, "diff_id": d, "chain_id": c, "unpacked": st.has_snapshot(c)})
                })
                .collect();
            let v = serde_json::json!({
                "reference": img.reference, "digest": img.digest(), "media_type": img.descriptor.media_type,
                "size": st.image_size(&img), "tags": tags, "config_digest": img.manifest.config.digest,
                "config": config, "layers": layers,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        ImageCommand::Tag { source, target } => {
            let img = find(&st, &source)?;
            let t = parse_ref(&target)?;
            st.tag(&t.to_string(), &img.descriptor)?;
            println!("{t} → {}", img.digest());
        }
        ImageCommand::Rm { reference } => {
            let _lock = c.state.lock(true)?;
            let img = find(&st, &reference)?;
            let refs = st.references()?;
            let others = refs
                .iter()
                .filter(|(r, d)| d.digest == img.digest() && **r != img.reference)
                .count();
            for (name, rec) in containers(c)? {
                let same_ref = rec.spec.image_ref.to_string() == img.reference;
                let same_digest = rec.image_digest.as_deref() == Some(img.digest());
                if same_ref || (same_digest && others == 0) {
                    bail!(crate::image::ImageError::InUse {
                        reference: img.reference.clone(),
                        container: name
                    });
                }
            }
            st.untag(&img.reference)?;
            if others == 0 {
                let freed = st.gc(&keep_chains(c, &st)?)?;
                println!(
                    "removed {} ({}), freed {}",
                    img.reference,
                    img.digest(),
                    human_bytes(freed)
                );
            } else {
                println!(
                    "untagged {} ({} other reference(s) keep the image)",
                    img.reference, others
                );
            }
        }
        ImageCommand::Push { reference, quiet } => {
            let img = find(&st, &reference)?;
            let dest = parse_ref(&img.reference)?;
            let client = RegistryClient::new(&c.config)?;
            let progress = Progress::auto(quiet);
            let digest =
                runtime()?.block_on(push::push(&client, &st, &img.reference, &dest, &progress))?;
            if !quiet {
                println!("pushed {dest}: {digest}");
            }
        }
        ImageCommand::Import { file, tag } => {
            let tag = tag.as_deref().map(parse_ref).transpose()?;
            let out = import::import(&st, &file, tag.as_ref(), &unpack_options(c))?;
            for (r, d) in out {
                println!("imported {r}: {d}");
            }
        }
        ImageCommand::Build {
            context,
            tag,
            file,
            build_args,
            network,
            no_cache,
            quiet,
            json,
        } => build_cmd(
            c,
            crate::build::BuildOptions {
                context,
                file,
                tag,
                args: build_args
                    .iter()
                    .map(|kv| match kv.split_once('=') {
                        Some((k, v)) => Ok((k.to_string(), v.to_string())),
                        None => std::env::var(kv).map(|v| (kv.clone(), v)).map_err(|_| {
                            anyhow::anyhow!(
                                "--build-arg {kv}: give K=V (or set {kv} in the environment)"
                            )
                        }),
                    })
                    .collect::<Result<_>>()?,
                network: crate::build::Network::parse(&network),
                no_cache,
                state_locked: false,
                cancel: Default::default(),
            },
            quiet || json,
            json,
        )?,
        ImageCommand::Prune { manifests, json } => {
            let _lock = c.state.lock(true)?;
            let mut keep_refs: BTreeSet<String> = BTreeSet::new();
            let mut keep_digests: BTreeSet<String> = BTreeSet::new();
            for rec in containers(c)?.values() {
                keep_refs.insert(rec.spec.image_ref.to_string());
                keep_digests.extend(rec.image_digest.clone());
            }
            if let Some(dir) = manifests {
                let d = crate::manifest::load_dir(&dir).map_err(|e| anyhow::anyhow!("{e}"))?;
                keep_refs.extend(d.images.values().map(|i| i.spec.reference.to_string()));
            }
            let mut removed = vec![];
            for (r, d) in st.references()? {
                if !keep_refs.contains(&r) && !keep_digests.contains(&d.digest) {
                    st.untag(&r)?;
                    removed.push(r);
                }
            }
            let freed = st.gc(&keep_chains(c, &st)?)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"removed": removed, "bytes_freed": freed})
                );
            } else {
                for r in &removed {
                    println!("removed {r}");
                }
                println!("freed {}", human_bytes(freed));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Snapshots containers still use (their images may have been untagged).
/// The snapshots containers stand on: every layer of every container's runtime config (what
/// its root file system is mounted from), whatever the tags say now (a re-pulled tag no
/// longer names the image a running container was made from), and, for containers not yet
/// made, their recorded image's.
fn keep_chains(c: &Ctx, st: &Store) -> Result<BTreeSet<String>> {
    let mut keep = BTreeSet::new();
    let rt = super::containers::runtime(c)?;
    // by name (containers made before slots) and by slot (every other, whatever its name or
    // area: one started beside its predecessor, one being retired)
    let slots = rt.by_slot();
    let all = rt
        .names()
        .into_iter()
        .map(|n| (&rt, n))
        .chain(slots.names().into_iter().map(|n| (&slots, n)));
    for (rt, name) in all {
        let Ok(cfg) = rt.config(&name) else {
            continue;
        };
        for layer in &cfg.layers {
            // STATE/snapshots/<chain hex>/fs
            if let Some(hex) = layer
                .parent()
                .filter(|p| p.parent() == Some(st.snapshots.as_path()))
                .and_then(|p| p.file_name())
                .and_then(|h| h.to_str())
            {
                keep.insert(format!("sha256:{hex}"));
            }
        }
    }
    let refs = st.references()?;
    for rec in containers(c)?.values() {
        if let Some(d) = &rec.image_digest
            && let Some((r, desc)) = refs.iter().find(|(_, x)| &x.digest == d)
            && let Ok(img) = st.load(r, desc)
        {
            keep.extend(img.chain_ids());
        }
    }
    Ok(keep)
}

/// Step lines and RUN output on stderr (stdout keeps the result).
struct BuildOutput {
    quiet: bool,
}

impl crate::build::BuildEvents for BuildOutput {
    fn step(&self, n: usize, total: usize, instruction: &str, cached: bool) {
        if !self.quiet {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "[{n}/{total}] {}{}",
                crate::text::printable(instruction, 200),
                if cached { " (cached)" } else { "" }
            );
        }
    }
    fn output(&self, line: &str) {
        if !self.quiet {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "  {}",
                crate::text::printable(line, 4096)
            );
        }
    }
}

fn build_cmd(c: &Ctx, opts: crate::build::BuildOptions, quiet: bool, json: bool) -> Result<()> {
    let tokio = runtime()?;
    let host = super::host(c, &tokio)?;
    // Ctrl-C or SIGTERM: the RUN under way is killed and the build's leftovers removed
    // before berth exits, instead of a step running on unattended
    let cancel = opts.cancel.clone();
    tokio.spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut i), Ok(mut t), Ok(mut h)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            return;
        };
        tokio::select! {
            _ = i.recv() => {}
            _ = t.recv() => {}
            _ = h.recv() => {}
        }
        cancel.cancel();
    });
    let built = crate::build::build(&host, &opts, &BuildOutput { quiet })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&built)?);
    } else if quiet {
        println!("{}", built.digest);
    } else {
        let cached = built.steps.iter().filter(|s| s.cached).count();
        eprintln!(
            "built {} ({} step(s), {cached} from the cache)",
            built.reference,
            built.steps.len()
        );
        println!("{}", built.digest);
    }
    Ok(())
}
