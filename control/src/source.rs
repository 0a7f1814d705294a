//! Where resources come from: a directory of manifests, read recursively and watched. This is the
//! only module that knows about files, so a Kubernetes API watch can stand beside it and feed the
//! same `Parsed` to `compile`.
//!
//! A file that stops being valid YAML (an editor's half-written save, say) keeps its last good
//! objects in the next snapshot, with the error reported: a typo must not silently drop a DENY.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher as _};

use crate::compile::{self, Options};
use crate::parse::{self, Object, Parsed};
use crate::problem::{Origin, Problem};
use crate::snapshot::Snapshot;
use crate::vip::Allocations;

/// Directory nesting below the root that is still read (deeper is reported, not followed).
pub const MAX_DEPTH: usize = 32;
/// Quiet time after the last change before reloading: an editor's save or a `kubectl`-style
/// multi-file write settles into one reload.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// A stream of changes still reloads at least this often.
pub const DEBOUNCE_MAX: Duration = Duration::from_secs(1);

/// A directory of manifests.
pub struct ManifestDir {
    root: PathBuf,
    /// Objects of each file as last read without a YAML error.
    last_good: HashMap<PathBuf, Vec<Object>>,
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

fn is_hidden(path: &Path) -> bool {
    // Editors' swap files and Kubernetes' `..data` ConfigMap links start with a dot.
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

impl ManifestDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            last_good: HashMap::new(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every manifest file under the root, sorted (so documents are read in a stable order).
    pub fn files(&self, problems: &mut Vec<Problem>) -> io::Result<Vec<PathBuf>> {
        let meta = fs::metadata(&self.root)?;
        if meta.is_file() {
            return Ok(vec![self.root.clone()]);
        }
        let mut files = Vec::new();
        let mut seen = HashSet::new();
        let mut stack = vec![(self.root.clone(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            // Symbolic links may loop; a directory is read once.
            if let Ok(real) = fs::canonicalize(&dir) {
                if !seen.insert(real) {
                    continue;
                }
            }
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(err) if dir == self.root => return Err(err),
                Err(err) => {
                    problems.push(Problem::error(format!(
                        "cannot read directory {}: {err}",
                        dir.display()
                    )));
                    continue;
                }
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if is_hidden(&path) {
                    continue;
                }
                let Ok(meta) = fs::metadata(&path) else {
                    continue;
                };
                if meta.is_dir() {
                    if depth + 1 > MAX_DEPTH {
                        problems.push(Problem::warning(format!(
                            "{} is nested more than {MAX_DEPTH} directories deep; not read",
                            path.display()
                        )));
                    } else {
                        stack.push((path, depth + 1));
                    }
                } else if meta.is_file() && is_manifest(&path) {
                    files.push(path);
                }
            }
        }
        files.sort();
        Ok(files)
    }

    /// Reads and parses every file. Fails only when the root itself cannot be read.
    pub fn load(&mut self) -> io::Result<(Parsed, usize)> {
        let mut listing_problems = Vec::new();
        let files = self.files(&mut listing_problems)?;
        let mut parsed = Parsed::default();
        for p in listing_problems {
            parsed.problems.push(p);
        }
        let mut still_present = HashSet::new();
        for path in &files {
            still_present.insert(path.clone());
            let name: Arc<str> = Arc::from(path.display().to_string());
            let origin = Origin {
                file: name.clone(),
                document: 1,
                line: 1,
            };
            let text = match fs::metadata(path) {
                Ok(m) if m.len() > parse::MAX_FILE_BYTES as u64 => {
                    parsed.problems.push(
                        Problem::error(format!(
                            "file is {} bytes, over the limit of {} bytes; nothing in it was read",
                            m.len(),
                            parse::MAX_FILE_BYTES
                        ))
                        .at(&origin)
                        .hint("split it into several files"),
                    );
                    continue;
                }
                _ => match fs::read(path) {
                    Ok(bytes) => match String::from_utf8(bytes) {
                        Ok(text) => text,
                        Err(_) => {
                            parsed
                                .problems
                                .push(Problem::error("file is not UTF-8 text").at(&origin));
                            continue;
                        }
                    },
                    Err(err) => {
                        parsed
                            .problems
                            .push(Problem::error(format!("cannot read: {err}")).at(&origin));
                        continue;
                    }
                },
            };
            let mut one = Parsed::default();
            let valid = parse::parse_file(&name, &text, &mut one);
            if valid {
                self.last_good.insert(path.clone(), one.objects.clone());
                parsed.objects.extend(one.objects);
            } else if let Some(previous) = self.last_good.get(path) {
                parsed.problems.push(
                    Problem::warning(format!("serving this file's last good version ({} objects) until its YAML is fixed", previous.len()))
                        .at(&origin),
                );
                parsed.objects.extend(previous.iter().cloned());
            } else {
                parsed.objects.extend(one.objects);
            }
            parsed.problems.extend(one.problems);
            for (kind, (count, origin)) in one.skipped {
                let entry = parsed.skipped.entry(kind).or_insert((0, origin));
                entry.0 += count;
            }
        }
        self.last_good
            .retain(|path, _| still_present.contains(path));
        Ok((parsed, files.len()))
    }

    /// Loads and compiles in one step.
    pub fn snapshot(&mut self, previous: &Allocations, options: &Options) -> io::Result<Snapshot> {
        let started = Instant::now();
        let (parsed, files) = self.load()?;
        let documents = parsed.objects.len();
        let parse_time = started.elapsed();
        let mut snapshot = compile::compile(parsed, previous, options);
        snapshot.stats.files = files;
        snapshot.stats.documents = documents;
        snapshot.stats.parse_time = parse_time;
        Ok(snapshot)
    }
}

/// Watches a directory and yields once per settled burst of changes.
pub struct Watch {
    _watcher: notify::RecommendedWatcher,
    events: mpsc::Receiver<()>,
}

impl Watch {
    pub fn new(root: &Path) -> notify::Result<Self> {
        let (tx, events) = mpsc::channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let relevant = match &event {
                    Ok(e) => !e.kind.is_access() && e.paths.iter().any(|p| !is_hidden(p)),
                    Err(_) => true,
                };
                if relevant {
                    let _ = tx.send(());
                }
            })?;
        watcher.watch(root, RecursiveMode::Recursive)?;
        Ok(Self {
            _watcher: watcher,
            events,
        })
    }

    /// Waits for a change, then for `DEBOUNCE` of quiet (at most `DEBOUNCE_MAX`). `None` once
    /// `stop` says so (checked every `poll`).
    pub fn next(&self, poll: Duration, stop: &dyn Fn() -> bool) -> Option<()> {
        loop {
            if stop() {
                return None;
            }
            match self.events.recv_timeout(poll) {
                Ok(()) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
        let first = Instant::now();
        while first.elapsed() < DEBOUNCE_MAX {
            match self.events.recv_timeout(DEBOUNCE) {
                Ok(()) => continue,
                Err(_) => break,
            }
        }
        Some(())
    }
}
