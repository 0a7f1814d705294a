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
use crate::parse::{self, Parsed};
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
    /// Each file's text as last read without a YAML error: re-parsed only when the file breaks,
    /// so the cache costs the manifests' size, not their parsed objects'.
    last_good: HashMap<PathBuf, Arc<str>>,
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
        let mut texts = Vec::with_capacity(files.len());
        for path in &files {
            let name: Arc<str> = Arc::from(path.display().to_string());
            match read_text(path) {
                Ok(text) => texts.push((path, name, text)),
                Err(message) => {
                    let origin = Origin::file_start(&name);
                    let mut problem = Problem::error(message).at(&origin);
                    if problem.message.contains("over the limit") {
                        problem = problem.hint("split it into several files");
                    }
                    parsed.problems.push(problem);
                }
            }
        }
        let results = parse_all(&texts);
        for ((path, name, text), (mut one, valid)) in texts.iter().zip(results) {
            if valid {
                self.last_good
                    .insert((*path).clone(), Arc::from(text.as_str()));
            } else if let Some(previous) = self.last_good.get(*path) {
                let mut good = Parsed::default();
                parse::parse_file(name, previous, &mut good);
                let origin = Origin::file_start(name);
                parsed.problems.push(
                    Problem::warning(format!(
                        "serving this file's last good version ({} objects) until its YAML is fixed",
                        good.objects.len()
                    ))
                    .at(&origin),
                );
                one.objects = good.objects;
            }
            parsed.objects.append(&mut one.objects);
            parsed.problems.extend(one.problems);
            for (kind, (count, origin)) in one.skipped {
                let entry = parsed.skipped.entry(kind).or_insert((0, origin));
                entry.0 += count;
            }
        }
        let still_present: HashSet<&PathBuf> = files.iter().collect();
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

/// Below this much text, parsing on one thread beats starting others.
const PARALLEL_PARSE_MIN_BYTES: usize = 1024 * 1024;
/// Parsing threads at most (files are independent; YAML parsing is most of a load's time).
const PARSE_THREADS_MAX: usize = 8;

fn read_text(path: &Path) -> Result<String, String> {
    if let Ok(m) = fs::metadata(path) {
        if m.len() > parse::MAX_FILE_BYTES as u64 {
            return Err(format!(
                "file is {} bytes, over the limit of {} bytes; nothing in it was read",
                m.len(),
                parse::MAX_FILE_BYTES
            ));
        }
    }
    let bytes = fs::read(path).map_err(|err| format!("cannot read: {err}"))?;
    String::from_utf8(bytes).map_err(|_| "file is not UTF-8 text".to_string())
}

/// Parses every file, on several threads when there is enough text; results in file order.
fn parse_all(texts: &[(&PathBuf, Arc<str>, String)]) -> Vec<(Parsed, bool)> {
    let total: usize = texts.iter().map(|(_, _, t)| t.len()).sum();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(PARSE_THREADS_MAX);
    let parse_one = |(_, name, text): &(&PathBuf, Arc<str>, String)| {
        let mut one = Parsed::default();
        let valid = parse::parse_file(name, text, &mut one);
        (one, valid)
    };
    if threads < 2 || total < PARALLEL_PARSE_MIN_BYTES {
        return texts.iter().map(parse_one).collect();
    }
    // Contiguous chunks of about equal bytes keep the merge in file order.
    let per_thread = total.div_ceil(threads);
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (_, _, text)) in texts.iter().enumerate() {
        bytes += text.len();
        if bytes >= per_thread {
            chunks.push(&texts[start..=i]);
            start = i + 1;
            bytes = 0;
        }
    }
    if start < texts.len() {
        chunks.push(&texts[start..]);
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| scope.spawn(move || chunk.iter().map(parse_one).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(results) => results,
                // Parsing is panic-free by design (serde-saphyr's promise); should a bug prove
                // otherwise, the panic surfaces here rather than being swallowed.
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}

/// What the watching thread waits for: a change under the manifests' root, or the word to stop.
/// Both arrive on one channel, so the thread sleeps until one of them comes instead of waking to
/// poll a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Changed,
    Stop,
}

/// A watch on the manifests' root: while it lives, changes under the root are sent as
/// `Signal::Changed` to the channel it was given.
pub struct Watch {
    _watcher: notify::RecommendedWatcher,
}

impl Watch {
    pub fn new(root: &Path, signals: mpsc::Sender<Signal>) -> notify::Result<Self> {
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let relevant = match &event {
                    Ok(e) => !e.kind.is_access() && e.paths.iter().any(|p| !is_hidden(p)),
                    Err(_) => true,
                };
                if relevant {
                    let _ = signals.send(Signal::Changed);
                }
            })?;
        watcher.watch(root, RecursiveMode::Recursive)?;
        Ok(Self { _watcher: watcher })
    }
}

/// Waits for a change, then for `DEBOUNCE` of quiet (at most `DEBOUNCE_MAX`). `None` once told to
/// stop (or every sender is gone).
pub fn next_change(signals: &mpsc::Receiver<Signal>) -> Option<()> {
    match signals.recv() {
        Ok(Signal::Changed) => {}
        Ok(Signal::Stop) | Err(_) => return None,
    }
    let first = Instant::now();
    while first.elapsed() < DEBOUNCE_MAX {
        match signals.recv_timeout(DEBOUNCE) {
            Ok(Signal::Changed) => continue,
            Ok(Signal::Stop) => return None,
            Err(_) => break,
        }
    }
    Some(())
}
