//! The build script's part for operators written in Python and JavaScript:
//! `plugins/python-*/app.py` built with componentize-py and
//! `plugins/js-*/operator.js` built with componentize-js, each at its pinned
//! version, against `wit/` alone (no memento SDK).
//!
//! They are optional: without the tools the Rust plugins build as before and
//! cargo shows one warning line saying how to install them. A build takes
//! 10–40 s, so it runs only when its inputs (sources, `wit/`, tool version)
//! changed, recorded in a `.inputs` file beside the component.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The pinned tool versions (what `.ci/run` installs and the README names).
pub const COMPONENTIZE_PY: &str = "0.25.1";
pub const COMPONENTIZE_JS: &str = "0.23";

const PY_INSTALL: &str = "pip install componentize-py==0.25.1";
const JS_INSTALL: &str =
    "npm install --prefix target/tools/componentize-js @bytecodealliance/componentize-js@0.23";

/// WASI features componentize-js would otherwise import: `http` and
/// `fetch-event` import `wasi:http`, which the host does not provide (the
/// component is refused at link time); clocks and randomness break the
/// determinism exactly-once relies on; stdio only adds imports (a thrown
/// value is not printed anyway, see `operator.js`).
const JS_DISABLED: [&str; 5] = ["http", "fetch-event", "stdio", "random", "clocks"];

/// One interpreted operator and how it went.
pub struct Built {
    /// Directory name under `plugins/`, e.g. `python-wordcount`.
    pub name: String,
    /// The component, or why it was not built (tool missing).
    pub result: Result<PathBuf, String>,
}

enum Lang {
    Python,
    Js,
}

struct Tool {
    /// The command that runs it (program and leading arguments).
    command: Vec<String>,
    /// Its version line, part of the inputs' fingerprint.
    version: String,
}

/// Build every `plugins/python-*` and `plugins/js-*` into `out_dir`.
///
/// # Errors
/// When a tool is there but a build fails: that is a broken plugin, not a
/// missing optional tool.
pub fn build(root: &Path, out_dir: &Path, work_dir: &Path) -> Result<Vec<Built>, String> {
    let plugins_dir = root.join("plugins");
    let mut found = Vec::new();
    let entries =
        std::fs::read_dir(&plugins_dir).map_err(|e| format!("cannot list {}: {e}", plugins_dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let lang = if name.starts_with("python-") {
            Lang::Python
        } else if name.starts_with("js-") {
            Lang::Js
        } else {
            continue;
        };
        found.push((name, lang));
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    if found.is_empty() {
        return Ok(Vec::new());
    }
    let py = python_tool(root);
    let js = js_tool(root);
    let mut missing = Vec::new();
    if let Err(why) = &py
        && found.iter().any(|(_, l)| matches!(l, Lang::Python))
    {
        missing.push(why.clone());
    }
    if let Err(why) = &js
        && found.iter().any(|(_, l)| matches!(l, Lang::Js))
    {
        missing.push(why.clone());
    }
    if !missing.is_empty() {
        // The one line the brief of this build promises.
        println!(
            "cargo::warning=Python/JavaScript example operators not built: {}",
            missing.join("; ")
        );
    }
    // Start every build, then wait for all: they take long and are mostly
    // single-threaded.
    let mut running = Vec::new();
    for (name, lang) in found {
        let tool = match lang {
            Lang::Python => &py,
            Lang::Js => &js,
        };
        let tool = match tool {
            Ok(t) => t,
            Err(why) => {
                running.push((name, Err(why.clone()), None));
                continue;
            }
        };
        let src = plugins_dir.join(&name);
        let out = out_dir.join(format!("{}.wasm", name.replace('-', "_")));
        let fingerprint = inputs(root, &src, tool)?;
        let stamp = out.with_extension("inputs");
        if out.is_file() && std::fs::read(&stamp).is_ok_and(|s| s == fingerprint.as_bytes()) {
            running.push((name, Ok(out), None));
            continue;
        }
        let child = start(root, &src, &out, work_dir, &name, &lang, tool)?;
        running.push((name, Ok(out), Some((child, stamp, fingerprint))));
    }
    let mut built = Vec::new();
    for (name, result, child) in running {
        if let Some((child, stamp, fingerprint)) = child {
            let output = child
                .wait_with_output()
                .map_err(|e| format!("building plugins/{name}: {e}"))?;
            if !output.status.success() {
                let text = String::from_utf8_lossy(&output.stderr);
                let stdout = String::from_utf8_lossy(&output.stdout);
                // The tool's own words, for the author to act on.
                eprintln!("{stdout}{text}");
                let last = text
                    .lines()
                    .chain(stdout.lines())
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("no output");
                return Err(format!("building plugins/{name} failed: {}", last.trim()));
            }
            std::fs::write(&stamp, fingerprint)
                .map_err(|e| format!("cannot write {}: {e}", stamp.display()))?;
        }
        built.push(Built { name, result });
    }
    Ok(built)
}

/// blake3 over the tool's version, the plugin's files and `wit/`.
fn inputs(root: &Path, src: &Path, tool: &Tool) -> Result<String, String> {
    let mut h = Hasher::default();
    h.add(tool.version.as_bytes());
    h.add(format!("{:?}", JS_DISABLED).as_bytes());
    for dir in [src.to_path_buf(), root.join("wit")] {
        let mut files = Vec::new();
        walk(&dir, &mut files)?;
        files.sort();
        for f in files {
            h.add(f.strip_prefix(root).unwrap_or(&f).to_string_lossy().as_bytes());
            h.add(&std::fs::read(&f).map_err(|e| format!("cannot read {}: {e}", f.display()))?);
        }
    }
    Ok(h.hex())
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), String> {
    for entry in std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') || name == "__pycache__" || name == "node_modules" {
            continue;
        }
        if path.is_dir() {
            walk(&path, files)?;
        } else {
            files.push(path);
        }
    }
    Ok(())
}

/// FNV-1a, twice with different seeds: a fingerprint for "did the inputs
/// change", not a security boundary (the build script has no blake3).
#[derive(Default)]
struct Hasher(u64, u64);

impl Hasher {
    fn add(&mut self, bytes: &[u8]) {
        if self.0 == 0 {
            self.0 = 0xcbf2_9ce4_8422_2325;
            self.1 = 0x6c62_272e_07bb_0142;
        }
        for &b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
            self.1 = (self.1 ^ u64::from(b))
                .wrapping_mul(0x0000_0100_0000_01b3)
                .rotate_left(5);
        }
    }
    fn hex(&self) -> String {
        format!("{:016x}{:016x}", self.0, self.1)
    }
}

fn start(
    root: &Path,
    src: &Path,
    out: &Path,
    work_dir: &Path,
    name: &str,
    lang: &Lang,
    tool: &Tool,
) -> Result<std::process::Child, String> {
    let mut cmd = Command::new(&tool.command[0]);
    cmd.args(&tool.command[1..]);
    match lang {
        Lang::Python => {
            // componentize-py imports the app to find its exports and
            // leaves `__pycache__` beside it; build from a copy so that the
            // source tree (which cargo watches) stays untouched.
            let copy = work_dir.join(name);
            let _ = std::fs::remove_dir_all(&copy);
            copy_dir(src, &copy)?;
            cmd.current_dir(&copy)
                .arg("-d")
                .arg(root.join("wit"))
                .args(["-w", "plugin", "componentize", "app", "-o"])
                .arg(out);
        }
        Lang::Js => {
            cmd.current_dir(src)
                .arg(src.join("operator.js"))
                .arg("--wit")
                .arg(root.join("wit"))
                .args(["--world-name", "plugin"]);
            for feature in JS_DISABLED {
                cmd.args(["-d", feature]);
            }
            cmd.arg("-o").arg(out);
        }
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.spawn()
        .map_err(|e| format!("cannot run {} for plugins/{name}: {e}", tool.command.join(" ")))
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| format!("cannot create {}: {e}", to.display()))?;
    let mut files = Vec::new();
    walk(from, &mut files)?;
    for f in files {
        let dest = to.join(f.strip_prefix(from).expect("walked from `from`"));
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::copy(&f, &dest).map_err(|e| format!("cannot copy {}: {e}", f.display()))?;
    }
    Ok(())
}

/// `componentize-py` at the pinned version: `$MEMENTO_COMPONENTIZE_PY`, else
/// on the PATH.
fn python_tool(_root: &Path) -> Result<Tool, String> {
    println!("cargo::rerun-if-env-changed=MEMENTO_COMPONENTIZE_PY");
    let program = std::env::var("MEMENTO_COMPONENTIZE_PY").unwrap_or_else(|_| "componentize-py".into());
    let not_found = format!("componentize-py {COMPONENTIZE_PY} not found (`{PY_INSTALL}`)");
    let out = Command::new(&program)
        .arg("--version")
        .output()
        .map_err(|_| not_found.clone())?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        return Err(not_found);
    }
    if version != format!("componentize-py {COMPONENTIZE_PY}") {
        return Err(format!(
            "found {version:?}, need componentize-py {COMPONENTIZE_PY} (`{PY_INSTALL}`)"
        ));
    }
    Ok(Tool {
        command: vec![program],
        version,
    })
}

/// componentize-js at the pinned version: `$MEMENTO_COMPONENTIZE_JS` (its
/// `src/cli.js` or the `.bin` link), else the install `.ci/run` makes in
/// `target/tools/componentize-js`; run with `node`.
fn js_tool(root: &Path) -> Result<Tool, String> {
    println!("cargo::rerun-if-env-changed=MEMENTO_COMPONENTIZE_JS");
    let not_found = format!("componentize-js {COMPONENTIZE_JS} not found (`{JS_INSTALL}`)");
    let local = root.join("target/tools/componentize-js/node_modules/.bin/componentize-js");
    let cli = match std::env::var_os("MEMENTO_COMPONENTIZE_JS") {
        Some(p) => PathBuf::from(p),
        None if local.exists() => local,
        None => return Err(not_found),
    };
    let out = Command::new("node")
        .arg(&cli)
        .arg("--version")
        .output()
        .map_err(|_| {
            format!("node not found, needed by componentize-js (`{JS_INSTALL}` needs node and npm)")
        })?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        return Err(not_found);
    }
    if !version.starts_with(&format!("{COMPONENTIZE_JS}.")) {
        return Err(format!(
            "found componentize-js {version}, need {COMPONENTIZE_JS}.x (`{JS_INSTALL}`)"
        ));
    }
    Ok(Tool {
        command: vec!["node".into(), cli.display().to_string()],
        version: format!("componentize-js {version}"),
    })
}
