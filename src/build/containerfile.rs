//! Dockerfile / Containerfile text → [`Containerfile`]: global ARGs and stages of typed
//! instructions, for berth's own image builder.
//!
//! The syntax is Docker's (<https://docs.docker.com/reference/dockerfile/>), read the way
//! BuildKit reads it, so that a file that builds with `docker build` means the same here:
//! parser directives, comments, continuation lines, case-insensitive keywords, leading
//! `--flags`, JSON (exec) forms. Instructions berth does not implement are errors rather than
//! being skipped: an image built without its HEALTHCHECK or VOLUME would silently differ.
//!
//! Variables are not substituted here: what `$A` means depends on the ENV and ARG in force at
//! each step, which only the builder knows; it calls [`expand`]. Quotes, however, are removed
//! here, once, so that the builder sees values (`ENV A="x y"` gives `x y`). To keep Docker's
//! meaning across the two steps, every string Docker expands (FROM's image, ENV, ARG, LABEL,
//! COPY/ADD paths, WORKDIR, USER, EXPOSE) is stored in [`expand`]'s input syntax: a character
//! that was quoted or escaped in the file and that [`expand`] would otherwise interpret (`$`,
//! the escape character, a `}` inside `${…}`) keeps an escape character in front. So
//! `ENV A='$HOME'` stores `\$HOME`, which expands to `$HOME` as in Docker, while
//! `ENV B="$HOME"` stores `$HOME`, which expands to the home directory. RUN, CMD and ENTRYPOINT
//! are kept as written: Docker leaves them to the shell. MAINTAINER is kept as written too:
//! Docker does not expand it.
//!
//! Every problem is reported, each with `file:line:col` (1-based, columns in characters).

use crate::manifest::Diagnostic;
use crate::text::printable;
use std::collections::HashMap;
use std::path::Path;

/// Far above any real Containerfile; bounds the memory and time a hostile file can cost.
const MAX_BYTES: usize = 1 << 20;
/// Same reason, counted in instructions (each may allocate a stage, a diagnostic, …).
const MAX_INSTRUCTIONS: usize = 10_000;
/// A file that is not a Containerfile at all (a binary, a wrong path) would otherwise produce
/// one message per word; past this many, the report only says how many more there were.
const MAX_DIAGNOSTICS: usize = 1_000;
/// `${a:-${b:-…}}` is expanded recursively: the bound keeps a hostile value from exhausting
/// the stack, and no real file nests this deep.
const MAX_NESTING: usize = 32;
/// How many characters of the input a message echoes.
const ECHO: usize = 60;

/// A parsed Containerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Containerfile {
    /// ARGs declared before the first FROM (usable in FROM lines): name and default.
    pub global_args: Vec<(String, Option<String>)>,
    pub stages: Vec<Stage>,
    /// The escape character (`# escape=` directive); every stored string that [`expand`]
    /// reads is written with it.
    escape: char,
}

impl Containerfile {
    /// The escape character the file declared (`# escape=` parser directive), `\` by default.
    /// Pass it to [`expand`]: the stored strings escape literal `$` with it.
    pub fn escape(&self) -> char {
        self.escape
    }
}

/// One `FROM` and the instructions up to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// The FROM image as written, unquoted (may contain $VARS from global args): a reference,
    /// "scratch", or an earlier stage's name.
    pub from: String,
    /// `AS name`, lowercased.
    pub name: Option<String>,
    pub line: usize,
    pub instructions: Vec<Instruction>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// 1-based line of the instruction's first line.
    pub line: usize,
    /// The instruction as written, continuation lines joined with single spaces and comments
    /// inside continuations removed (for build history and the cache key), e.g.
    /// `RUN apt-get update && apt-get install -y x`. Where a continuation joins two words with
    /// no blank between them (`echo a\` + `b`), no space is put in, so the text still says
    /// what runs (`echo ab`).
    pub text: String,
    pub kind: Kind,
}

/// What an instruction does. Strings the builder expands are unquoted and in [`expand`]'s
/// input syntax (see the module documentation); commands are as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Run(Command),
    Cmd(Command),
    Entrypoint(Command),
    Copy(Copy),
    Add(Copy),
    /// key/value pairs, values unquoted but NOT variable-expanded.
    Env(Vec<(String, String)>),
    Arg(String, Option<String>),
    Workdir(String),
    User(String),
    Label(Vec<(String, String)>),
    /// raw port specs ("80", "443/tcp", "$PORT").
    Expose(Vec<String>),
    /// The rest of the line, as written (Docker neither unquotes nor expands it).
    Maintainer(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Shell form: run with the image's shell (`/bin/sh -c`). The text as Docker joins it:
    /// continuation lines glued with nothing in between.
    Shell(String),
    /// Exec (JSON array) form.
    Exec(Vec<String>),
}

/// COPY and ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    pub sources: Vec<String>,
    pub dest: String,
    /// `--from=stage-name-or-index-or-image`.
    pub from: Option<String>,
    /// `--chown=user[:group]`.
    pub chown: Option<String>,
    /// `--chmod=0755` (octal), validated.
    pub chmod: Option<u32>,
}

/// Parse the whole file. Every problem is reported (not just the first), each with
/// file:line:col, in file order.
pub fn parse(text: &str, file: &Path) -> Result<Containerfile, Vec<Diagnostic>> {
    let mut p = Parser {
        file,
        escape: '\\',
        diags: Vec::new(),
        dropped: 0,
        global_args: Vec::new(),
        stages: Vec::new(),
        names: HashMap::new(),
    };
    if text.len() > MAX_BYTES {
        p.report(
            1,
            1,
            format!(
                "the file is {} bytes; a Containerfile may be at most 1 MiB",
                text.len()
            ),
        );
        return Err(p.diags);
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();

    // Directives are looked for until the first line that is not one (Docker: "once a
    // comment, empty line or builder instruction has been processed, BuildKit no longer looks
    // for parser directives").
    let mut directives = true;
    let mut seen: Vec<String> = Vec::new();
    let mut count = 0usize;
    let mut cut = false;
    let mut i = 0usize;
    while let Some(&raw) = lines.get(i) {
        i += 1;
        let lineno = i;
        let trimmed = raw.trim_start();
        let lead = raw.chars().count().saturating_sub(trimmed.chars().count());
        if directives {
            match directive(trimmed) {
                Some((name, value)) if matches!(name.as_str(), "escape" | "syntax" | "check") => {
                    if seen.contains(&name) {
                        p.report(
                            lineno,
                            lead + 1,
                            format!("the {name} parser directive may be given only once"),
                        );
                    } else if name == "escape" {
                        match value {
                            "\\" => p.escape = '\\',
                            "`" => p.escape = '`',
                            _ => p.report(
                                lineno,
                                lead + 1,
                                format!(
                                    "invalid escape character {}: the escape directive takes \\ or `",
                                    printable(value, ECHO)
                                ),
                            ),
                        }
                    }
                    seen.push(name);
                    continue;
                }
                // an unknown directive is a comment, and ends the directives
                _ => directives = false,
            }
        }
        if trimmed.starts_with('#') {
            continue;
        }
        let esc = p.escape;
        let (first, mut more) = cut_continuation(trimmed, esc);
        if !more && first.is_empty() {
            continue;
        }
        let mut l = Logical {
            text: first.to_string(),
            segs: vec![(0, lineno, lead + 1)],
            display: first.trim_end().to_string(),
            line: lineno,
        };
        let mut blank_before = first.ends_with(char::is_whitespace);
        while more {
            let Some(&next) = lines.get(i) else { break };
            i += 1;
            let t = next.trim_start();
            // comments and empty lines inside a continuation are skipped, as by Docker
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let (part, m) = cut_continuation(next, esc);
            more = m;
            l.segs.push((l.text.len(), i, 1));
            l.text.push_str(part);
            let shown = part.trim();
            if shown.is_empty() {
                blank_before |= !part.is_empty();
                continue;
            }
            if !l.display.is_empty() && (blank_before || part.starts_with(char::is_whitespace)) {
                l.display.push(' ');
            }
            l.display.push_str(shown);
            blank_before = part.ends_with(char::is_whitespace);
        }
        count += 1;
        if count > MAX_INSTRUCTIONS {
            p.report(
                l.line,
                1,
                format!(
                    "more than {MAX_INSTRUCTIONS} instructions; a Containerfile may have at most {MAX_INSTRUCTIONS}"
                ),
            );
            cut = true;
            break;
        }
        for (word, strip_tabs) in p.instruction(&l) {
            // skip the heredoc body, already reported, so its lines are not read as instructions
            while let Some(&body) = lines.get(i) {
                i += 1;
                let body = if strip_tabs {
                    body.trim_start_matches('\t')
                } else {
                    body
                };
                if body == word {
                    break;
                }
            }
        }
    }
    if p.stages.is_empty() && !cut {
        p.report(
            1,
            1,
            "no FROM instruction: a Containerfile needs at least one stage".to_string(),
        );
    }
    if p.diags.is_empty() {
        return Ok(Containerfile {
            global_args: p.global_args,
            stages: p.stages,
            escape: p.escape,
        });
    }
    p.diags.sort_by_key(|d| (d.line, d.col));
    if p.dropped > 0 {
        let line = p.diags.last().map_or(1, |d| d.line);
        p.diags.push(Diagnostic {
            file: file.to_path_buf(),
            line,
            col: 1,
            message: format!("{} more problems not shown", p.dropped),
        });
    }
    Err(p.diags)
}

/// Expand $VAR, ${VAR}, ${VAR:-default}, ${VAR:+alternate} (nested words in default/alternate
/// also expanded) in `s`, as Docker does for ENV, ARG, FROM, COPY, ADD, WORKDIR, USER, LABEL,
/// EXPOSE. `escape` is the escape character (`\` or `` ` ``): `escape$` and `escape${` give a
/// literal `$`; as in Docker, the escape character before any other character gives that
/// character (so a doubled escape gives one), and a lone one at the end is dropped. Unknown
/// variables expand to "". Error (message) on an unterminated `${`, a bad modifier like
/// `${a:?x}` (unsupported), or an invalid name.
///
/// `$` not followed by a name or `{` is a literal `$`. A name is a letter or `_` followed by
/// letters, digits and `_`, or a run of digits (a positional parameter, looked up like any
/// other name).
pub fn expand(
    s: &str,
    escape: char,
    vars: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut x = Expander {
        chars: s.chars().collect(),
        pos: 0,
        esc: escape,
        vars,
    };
    x.word(false, 0)
}

struct Expander<'v> {
    chars: Vec<char>,
    pos: usize,
    esc: char,
    vars: &'v dyn Fn(&str) -> Option<String>,
}

impl Expander<'_> {
    /// Expands up to the end or, inside `${name:-word}` (`in_braces`), up to the `}` that
    /// closes it.
    fn word(&mut self, in_braces: bool, depth: usize) -> Result<String, String> {
        let mut out = String::new();
        while let Some(&c) = self.chars.get(self.pos) {
            self.pos += 1;
            if in_braces && c == '}' {
                return Ok(out);
            }
            if c == self.esc {
                if let Some(&n) = self.chars.get(self.pos) {
                    out.push(n);
                    self.pos += 1;
                }
            } else if c == '$' {
                self.dollar(depth, &mut out)?;
            } else {
                out.push(c);
            }
        }
        if in_braces {
            Err("unterminated ${: missing }".to_string())
        } else {
            Ok(out)
        }
    }

    /// After a `$`.
    fn dollar(&mut self, depth: usize, out: &mut String) -> Result<(), String> {
        match self.chars.get(self.pos).copied() {
            Some('{') => {
                self.pos += 1;
                self.braces(depth + 1, out)
            }
            Some(c) if c == '_' || c.is_alphanumeric() => {
                let name = self.name();
                out.push_str(&self.value(&name));
                Ok(())
            }
            _ => {
                out.push('$');
                Ok(())
            }
        }
    }

    /// After `${`.
    fn braces(&mut self, depth: usize, out: &mut String) -> Result<(), String> {
        if depth > MAX_NESTING {
            return Err(format!("substitutions nested more than {MAX_NESTING} deep"));
        }
        let name = self.name();
        let next = self.chars.get(self.pos).copied();
        self.pos += 1;
        match next {
            None => Err(format!("unterminated ${{{name}: missing }}")),
            Some('}') if name.is_empty() => Err("${} has no variable name".to_string()),
            Some(c) if name.is_empty() => Err(format!(
                "invalid variable name in ${{…}}: {}",
                printable(&c.to_string(), ECHO)
            )),
            Some('}') => {
                out.push_str(&self.value(&name));
                Ok(())
            }
            Some(':') => {
                let modifier = self.chars.get(self.pos).copied();
                self.pos += 1;
                match modifier {
                    Some(m @ ('-' | '+')) => {
                        let word = self.word(true, depth)?;
                        let value = self.value(&name);
                        match (m, value.is_empty()) {
                            ('-', true) | ('+', false) => out.push_str(&word),
                            ('-', false) => out.push_str(&value),
                            _ => {}
                        }
                        Ok(())
                    }
                    None => Err(format!("unterminated ${{{name}: missing }}")),
                    Some(m) => Err(format!(
                        "unsupported substitution ${{{name}:{}…}}: only ${{{name}:-word}} and ${{{name}:+word}} are supported",
                        printable(&m.to_string(), ECHO)
                    )),
                }
            }
            Some(c @ ('-' | '+' | '?' | '=' | '#' | '%' | '/' | '^' | ',')) => Err(format!(
                "unsupported substitution ${{{name}{c}…}}: only ${{{name}}}, ${{{name}:-word}} and ${{{name}:+word}} are supported"
            )),
            Some(c) => Err(format!(
                "invalid character {} in variable name ${{{name}…}}",
                printable(&c.to_string(), ECHO)
            )),
        }
    }

    /// Docker's name rule: a run of digits, or letters, digits and `_`.
    fn name(&mut self) -> String {
        let mut name = String::new();
        let digits = self.chars.get(self.pos).is_some_and(|c| c.is_ascii_digit());
        while let Some(&c) = self.chars.get(self.pos) {
            let ok = if digits {
                c.is_ascii_digit()
            } else {
                c == '_' || c.is_alphanumeric()
            };
            if !ok {
                break;
            }
            name.push(c);
            self.pos += 1;
        }
        name
    }

    fn value(&self, name: &str) -> String {
        (self.vars)(name).unwrap_or_default()
    }
}

/// One instruction after continuation lines are joined, with what is needed to point back
/// into the file.
struct Logical {
    /// Joined as Docker joins: escape character (and blanks after it) removed, nothing put
    /// in, so `echo a\` + `b` runs `echo ab`.
    text: String,
    /// `(byte offset in text, line, column)` where each physical line's part starts.
    segs: Vec<(usize, usize, usize)>,
    /// The [`Instruction::text`] form.
    display: String,
    /// The first line.
    line: usize,
}

impl Logical {
    /// Line and column of byte offset `off` of `text`.
    fn at(&self, off: usize) -> (usize, usize) {
        let mut cur = (0, self.line, 1);
        for &seg in &self.segs {
            if seg.0 <= off {
                cur = seg;
            } else {
                break;
            }
        }
        let chars = self.text.get(cur.0..off).map_or(0, |s| s.chars().count());
        (cur.1, cur.2 + chars)
    }
}

/// A `--name[=value]` word before an instruction's arguments.
struct Flag {
    name: String,
    value: Option<String>,
    /// Byte offset in the logical line.
    at: usize,
}

/// One instruction split into keyword, flags and arguments.
struct Line<'l> {
    l: &'l Logical,
    /// The keyword as written (for texts), and in capitals (for matching and messages).
    kw: &'l str,
    upper: String,
    kw_at: usize,
    flags: Vec<Flag>,
    /// After the flags, trimmed.
    args: &'l str,
    args_at: usize,
}

struct Parser<'a> {
    file: &'a Path,
    escape: char,
    diags: Vec<Diagnostic>,
    dropped: usize,
    global_args: Vec<(String, Option<String>)>,
    stages: Vec<Stage>,
    /// Stage name → line of its FROM, for the duplicate message.
    names: HashMap<String, usize>,
}

const SUPPORTED: [&str; 13] = [
    "FROM",
    "RUN",
    "CMD",
    "ENTRYPOINT",
    "COPY",
    "ADD",
    "ENV",
    "ARG",
    "WORKDIR",
    "USER",
    "LABEL",
    "EXPOSE",
    "MAINTAINER",
];

/// Docker's RUN flags: named as unsupported, so the message does not suggest a typo.
const RUN_FLAGS: [&str; 4] = ["mount", "network", "security", "device"];
const COPY_REFUSED: [&str; 3] = ["link", "parents", "exclude"];
const ADD_REFUSED: [&str; 7] = [
    "from",
    "link",
    "parents",
    "exclude",
    "keep-git-dir",
    "checksum",
    "unpack",
];

impl Parser<'_> {
    fn report(&mut self, line: usize, col: usize, message: String) {
        if self.diags.len() >= MAX_DIAGNOSTICS {
            self.dropped += 1;
            return;
        }
        self.diags.push(Diagnostic {
            file: self.file.to_path_buf(),
            line,
            col,
            message,
        });
    }

    /// A JSON form whose array holds something other than strings: docker refuses it
    /// rather than run `[1, 2]` as a shell command.
    fn not_strings<T>(&mut self, x: &Line<'_>) -> Option<T> {
        self.err(
            x.l,
            x.args_at,
            format!("{} in JSON form takes an array of strings only", x.upper),
        );
        None
    }

    fn err(&mut self, l: &Logical, off: usize, message: String) {
        let (line, col) = l.at(off);
        self.report(line, col, message);
    }

    /// [`unquote`], reporting at `at` (plus the offset inside `raw` when `exact`).
    fn unquote(&mut self, l: &Logical, at: usize, raw: &str, exact: bool) -> Option<String> {
        match unquote(raw, self.escape) {
            Ok(s) => Some(s),
            Err((off, msg)) => {
                self.err(l, if exact { at + off } else { at }, msg);
                None
            }
        }
    }

    /// Parses one instruction into the current stage (or the global ARGs). Returns the
    /// terminators of heredocs it started, for the caller to skip their bodies.
    fn instruction(&mut self, l: &Logical) -> Vec<(String, bool)> {
        let s = l.text.as_str();
        let kw_at = s.len() - s.trim_start().len();
        let kw_end = s
            .get(kw_at..)
            .and_then(|r| r.find(is_blank))
            .map_or(s.len(), |n| kw_at + n);
        let kw = s.get(kw_at..kw_end).unwrap_or("");
        if kw.is_empty() {
            return Vec::new();
        }
        let upper = kw.to_ascii_uppercase();
        if !SUPPORTED.contains(&upper.as_str()) {
            self.err(
                l,
                kw_at,
                // a word that is not a keyword is not echoed: a Containerfile that is
                // some other file must not have its lines printed
                if kw.len() <= 20 && kw.bytes().all(|b| b.is_ascii_alphabetic()) {
                    format!("unsupported instruction {}", printable(kw, ECHO))
                } else {
                    "unsupported instruction (not an instruction keyword)".to_string()
                },
            );
            return Vec::new();
        }
        if self.stages.is_empty() && upper != "FROM" && upper != "ARG" {
            self.err(
                l,
                kw_at,
                format!("{upper} before the first FROM: only ARG may come before FROM"),
            );
            return Vec::new();
        }
        let (flags, after_flags) = extract_flags(s, kw_end);
        let tail = s.get(after_flags..).unwrap_or("");
        let x = Line {
            l,
            kw,
            upper,
            kw_at,
            flags,
            args: tail.trim(),
            args_at: after_flags + (tail.len() - tail.trim_start().len()),
        };
        let mut heredocs = Vec::new();
        let kind = match x.upper.as_str() {
            "FROM" => {
                self.from(&x);
                None
            }
            "ARG" => {
                self.arg(&x);
                None
            }
            "RUN" | "CMD" | "ENTRYPOINT" => self.command(&x, &mut heredocs),
            "COPY" | "ADD" => self.copy(&x, &mut heredocs),
            "ENV" => self.env(&x),
            "LABEL" => self.label(&x),
            "WORKDIR" | "USER" => self.single(&x),
            "EXPOSE" => self.expose(&x),
            _ => self.maintainer(&x),
        };
        if let (Some(kind), Some(stage)) = (kind, self.stages.last_mut()) {
            stage.instructions.push(Instruction {
                line: l.line,
                text: l.display.clone(),
                kind,
            });
        }
        heredocs
    }

    /// Checks an instruction's `--flags`: `known` take a value and are returned as
    /// (name, value, offset); `refused` are Docker's flags that berth does not implement;
    /// anything else is unknown.
    fn flags(
        &mut self,
        x: &Line<'_>,
        known: &[&str],
        refused: &[&str],
    ) -> Vec<(String, String, usize)> {
        let mut out: Vec<(String, String, usize)> = Vec::new();
        for f in &x.flags {
            let name = f.name.as_str();
            if known.contains(&name) {
                match &f.value {
                    None => self.err(x.l, f.at, format!("--{name} needs a value: --{name}=…")),
                    Some(_) if out.iter().any(|(n, _, _)| n == name) => {
                        self.err(x.l, f.at, format!("--{name} is given twice"))
                    }
                    Some(v) if v.is_empty() => {
                        self.err(x.l, f.at, format!("--{name} needs a value: --{name}=…"))
                    }
                    Some(v) => out.push((name.to_string(), v.clone(), f.at)),
                }
            } else if refused.contains(&name) {
                self.err(x.l, f.at, format!("{} --{name} is not supported", x.upper));
            } else {
                self.err(
                    x.l,
                    f.at,
                    format!("unknown flag --{} for {}", printable(name, ECHO), x.upper),
                );
            }
        }
        out
    }

    /// `FROM [--platform=…] image [AS name]`. The stage is added even when the line has
    /// errors, so that the instructions after it are checked as part of a stage rather than
    /// each reported as coming before FROM.
    fn from(&mut self, x: &Line<'_>) {
        // the platform is the host's; the flag is accepted so common files parse
        self.flags(x, &["platform"], &[]);
        let words = split_blank(x.args, x.args_at);
        let as_name =
            words.len() == 3 && words.get(1).is_some_and(|w| w.1.eq_ignore_ascii_case("as"));
        if words.is_empty() {
            self.err(
                x.l,
                x.kw_at,
                "FROM needs an image: FROM image [AS name]".to_string(),
            );
        } else if words.len() != 1 && !as_name {
            let at = words.get(1).map_or(x.args_at, |w| w.0);
            self.err(
                x.l,
                at,
                "FROM takes an image and optionally AS name: FROM image [AS name]".to_string(),
            );
        }
        let mut from = String::new();
        if let Some(&(at, raw)) = words.first() {
            from = self.unquote(x.l, at, raw, true).unwrap_or_default();
        }
        let mut name = None;
        if let Some(&(at, raw)) = words.get(2).filter(|_| as_name) {
            let lower = raw.to_lowercase();
            if !valid_stage_name(&lower) {
                self.err(
                    x.l,
                    at,
                    format!(
                        "invalid stage name {}: a stage name starts with a letter and has only letters, digits, '-', '_' and '.'",
                        printable(raw, ECHO)
                    ),
                );
            } else if let Some(&first) = self.names.get(&lower) {
                self.err(
                    x.l,
                    at,
                    format!(
                        "duplicate stage name {lower}: already named by the FROM on line {first}"
                    ),
                );
            } else {
                self.names.insert(lower.clone(), x.l.line);
                name = Some(lower);
            }
        }
        self.stages.push(Stage {
            from,
            name,
            line: x.l.line,
            instructions: Vec::new(),
        });
    }

    /// `ARG name[=default] …`: one [`Kind::Arg`] per name (BuildKit accepts several on one
    /// line); before the first FROM, global ARGs.
    fn arg(&mut self, x: &Line<'_>) {
        self.flags(x, &[], &[]);
        let words = word_bounds(x.args, self.escape);
        if words.is_empty() {
            self.err(
                x.l,
                x.kw_at,
                "ARG needs a name: ARG NAME[=default]".to_string(),
            );
            return;
        }
        let several = words.len() > 1;
        for (a, b) in words {
            let word = x.args.get(a..b).unwrap_or("");
            let at = x.args_at + a;
            let (name_raw, default_raw) = match word.split_once('=') {
                Some((n, d)) => (n, Some(d)),
                None => (word, None),
            };
            let name = self.unquote(x.l, at, name_raw, true);
            let default = match default_raw {
                Some(d) => self
                    .unquote(x.l, at + name_raw.len() + 1, d, true)
                    .map(Some),
                None => Some(None),
            };
            let (Some(name), Some(default)) = (name, default) else {
                continue;
            };
            if name.is_empty() {
                self.err(x.l, at, "ARG needs a name before '='".to_string());
                continue;
            }
            if self.stages.is_empty() {
                self.global_args.push((name, default));
            } else if let Some(stage) = self.stages.last_mut() {
                let text = if several {
                    format!("{} {word}", x.kw)
                } else {
                    x.l.display.clone()
                };
                stage.instructions.push(Instruction {
                    line: x.l.line,
                    text,
                    kind: Kind::Arg(name, default),
                });
            }
        }
    }

    /// RUN, CMD, ENTRYPOINT: exec form when the arguments are a JSON array, else shell form.
    fn command(&mut self, x: &Line<'_>, heredocs: &mut Vec<(String, bool)>) -> Option<Kind> {
        let refused: &[&str] = if x.upper == "RUN" { &RUN_FLAGS } else { &[] };
        self.flags(x, &[], refused);
        if x.args.is_empty() {
            self.err(x.l, x.kw_at, format!("{} needs a command", x.upper));
            return None;
        }
        let cmd = match json_array(x.args) {
            Json::Strings(v) => {
                // `CMD []` and `ENTRYPOINT []` clear an inherited value; `RUN []` runs nothing
                if v.is_empty() && x.upper == "RUN" {
                    self.err(x.l, x.args_at, "RUN needs a command".to_string());
                    return None;
                }
                Command::Exec(v)
            }
            Json::NotStrings => return self.not_strings(x),
            Json::No => {
                if x.upper == "RUN" {
                    self.heredocs(x, heredocs);
                }
                Command::Shell(x.args.to_string())
            }
        };
        Some(match x.upper.as_str() {
            "RUN" => Kind::Run(cmd),
            "CMD" => Kind::Cmd(cmd),
            _ => Kind::Entrypoint(cmd),
        })
    }

    /// COPY and ADD: flags, then a JSON array or blank-separated words (quotes do not group
    /// words there; each word is then unquoted, as Docker does when it expands it).
    fn copy(&mut self, x: &Line<'_>, heredocs: &mut Vec<(String, bool)>) -> Option<Kind> {
        let is_copy = x.upper == "COPY";
        let known: &[&str] = if is_copy {
            &["from", "chown", "chmod"]
        } else {
            &["chown", "chmod"]
        };
        let refused: &[&str] = if is_copy { &COPY_REFUSED } else { &ADD_REFUSED };
        let mut c = Copy {
            sources: Vec::new(),
            dest: String::new(),
            from: None,
            chown: None,
            chmod: None,
        };
        for (name, value, at) in self.flags(x, known, refused) {
            match name.as_str() {
                "from" => c.from = Some(value),
                "chown" => c.chown = Some(value),
                _ => match parse_mode(&value) {
                    Some(m) => c.chmod = Some(m),
                    None => self.err(
                        x.l,
                        at,
                        format!(
                            "--chmod={}: expected an octal mode such as 0755",
                            printable(&value, ECHO)
                        ),
                    ),
                },
            }
        }
        let mut words = Vec::new();
        let mut n = 0;
        let mut ok = true;
        match json_array(x.args) {
            Json::Strings(items) => {
                n = items.len();
                for item in items {
                    match self.unquote(x.l, x.args_at, &item, false) {
                        Some(w) => words.push(w),
                        None => ok = false,
                    }
                }
            }
            Json::NotStrings => return self.not_strings(x),
            Json::No => {
                self.heredocs(x, heredocs);
                for (at, raw) in split_blank(x.args, x.args_at) {
                    n += 1;
                    match self.unquote(x.l, at, raw, true) {
                        Some(w) => words.push(w),
                        None => ok = false,
                    }
                }
            }
        }
        if n < 2 {
            self.err(
                x.l,
                x.kw_at,
                format!(
                    "{} needs at least one source and a destination: {} src… dest",
                    x.upper, x.upper
                ),
            );
            return None;
        }
        if !ok {
            return None;
        }
        c.dest = words.pop().unwrap_or_default();
        c.sources = words;
        Some(if is_copy { Kind::Copy(c) } else { Kind::Add(c) })
    }

    /// `ENV k=v …`, or the legacy `ENV key the rest of the line`.
    fn env(&mut self, x: &Line<'_>) -> Option<Kind> {
        self.flags(x, &[], &[]);
        if x.args.is_empty() {
            self.err(x.l, x.kw_at, "ENV needs NAME=value".to_string());
            return None;
        }
        let words = word_bounds(x.args, self.escape);
        let first = words
            .first()
            .and_then(|&(a, b)| x.args.get(a..b))
            .unwrap_or("");
        if first.contains('=') {
            return self.pairs(x, &words).map(Kind::Env);
        }
        let key_end = x.args.find(is_blank).unwrap_or(x.args.len());
        let key_raw = x.args.get(..key_end).unwrap_or("");
        let rest = x.args.get(key_end..).unwrap_or("");
        let value_raw = rest.trim_start();
        let value_at = x.args_at + key_end + (rest.len() - value_raw.len());
        if value_raw.is_empty() {
            self.err(
                x.l,
                x.args_at,
                format!(
                    "ENV {0} has no value: write ENV {0}=value",
                    printable(key_raw, ECHO)
                ),
            );
            return None;
        }
        let key = self.unquote(x.l, x.args_at, key_raw, true);
        let value = self.unquote(x.l, value_at, value_raw, true);
        let (key, value) = (key?, value?);
        if key.is_empty() {
            self.err(x.l, x.args_at, "ENV needs a variable name".to_string());
            return None;
        }
        Some(Kind::Env(vec![(key, value)]))
    }

    /// `LABEL k=v …` (the legacy `LABEL key value` form is refused: it is deprecated and
    /// easy to misread).
    fn label(&mut self, x: &Line<'_>) -> Option<Kind> {
        self.flags(x, &[], &[]);
        let words = word_bounds(x.args, self.escape);
        let first = words
            .first()
            .and_then(|&(a, b)| x.args.get(a..b))
            .unwrap_or("");
        if words.is_empty() || !first.contains('=') {
            self.err(
                x.l,
                if words.is_empty() { x.kw_at } else { x.args_at },
                "LABEL takes key=value pairs".to_string(),
            );
            return None;
        }
        self.pairs(x, &words).map(Kind::Label)
    }

    /// `k=v` words of ENV and LABEL: split at the first `=`, then each side unquoted.
    fn pairs(&mut self, x: &Line<'_>, words: &[(usize, usize)]) -> Option<Vec<(String, String)>> {
        let mut out = Vec::new();
        let mut ok = true;
        for &(a, b) in words {
            let word = x.args.get(a..b).unwrap_or("");
            let at = x.args_at + a;
            let Some((key_raw, value_raw)) = word.split_once('=') else {
                self.err(
                    x.l,
                    at,
                    format!("expected key=value, found {}", printable(word, ECHO)),
                );
                ok = false;
                continue;
            };
            let key = self.unquote(x.l, at, key_raw, true);
            let value = self.unquote(x.l, at + key_raw.len() + 1, value_raw, true);
            match (key, value) {
                (Some(k), _) if k.is_empty() => {
                    self.err(x.l, at, format!("{}: empty name before '='", x.upper));
                    ok = false;
                }
                (Some(k), Some(v)) => out.push((k, v)),
                _ => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// WORKDIR and USER: the rest of the line.
    fn single(&mut self, x: &Line<'_>) -> Option<Kind> {
        self.flags(x, &[], &[]);
        let workdir = x.upper == "WORKDIR";
        if x.args.is_empty() {
            let what = if workdir { "a path" } else { "a user" };
            self.err(x.l, x.kw_at, format!("{} needs {what}", x.upper));
            return None;
        }
        let v = self.unquote(x.l, x.args_at, x.args, true)?;
        Some(if workdir {
            Kind::Workdir(v)
        } else {
            Kind::User(v)
        })
    }

    fn expose(&mut self, x: &Line<'_>) -> Option<Kind> {
        self.flags(x, &[], &[]);
        let words = split_blank(x.args, x.args_at);
        if words.is_empty() {
            self.err(
                x.l,
                x.kw_at,
                "EXPOSE needs a port: EXPOSE 80[/tcp] …".to_string(),
            );
            return None;
        }
        let mut ports = Vec::new();
        let mut ok = true;
        for (at, raw) in words {
            match self.unquote(x.l, at, raw, true) {
                Some(p) => ports.push(p),
                None => ok = false,
            }
        }
        ok.then_some(Kind::Expose(ports))
    }

    fn maintainer(&mut self, x: &Line<'_>) -> Option<Kind> {
        self.flags(x, &[], &[]);
        if x.args.is_empty() {
            self.err(x.l, x.kw_at, "MAINTAINER needs a name".to_string());
            return None;
        }
        Some(Kind::Maintainer(x.args.to_string()))
    }

    /// BuildKit reads `<<EOF` … `EOF` after RUN, COPY and ADD as an inline file. berth does
    /// not; without knowing the syntax, each body line would be reported as a bad instruction.
    /// So the heredoc is reported once and its terminator handed back for the body to be
    /// skipped. A word is a heredoc as BuildKit decides: digits, `<<`, optional `-`, then a
    /// name without `<` (so `<<<` is not one).
    fn heredocs(&mut self, x: &Line<'_>, out: &mut Vec<(String, bool)>) {
        for (a, b) in word_bounds(x.args, self.escape) {
            let Some(word) = x.args.get(a..b) else {
                continue;
            };
            let Some(rest) = word
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .strip_prefix("<<")
            else {
                continue;
            };
            let (strip_tabs, rest) = match rest.strip_prefix('-') {
                Some(r) => (true, r),
                None => (false, rest),
            };
            if rest.contains('<') {
                continue;
            }
            let name: String = rest.chars().filter(|c| *c != '\'' && *c != '"').collect();
            if name.is_empty() {
                continue;
            }
            self.err(
                x.l,
                x.args_at + a,
                format!(
                    "heredocs (<<{}) are not supported: put the content in a file and COPY it",
                    printable(&name, ECHO)
                ),
            );
            out.push((name, strip_tabs));
        }
    }
}

/// Docker's blanks between the keyword and its arguments and between the words of FROM,
/// COPY, ADD and EXPOSE.
fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\u{b}' | '\u{c}' | '\r')
}

/// A `# name=value` parser directive: the name lowercased, and the value.
fn directive(line: &str) -> Option<(String, &str)> {
    let rest = line.strip_prefix('#')?.trim_start();
    let name_len = rest
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(rest.len());
    let name = rest.get(..name_len)?;
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    let value = rest.get(name_len..)?.trim_start().strip_prefix('=')?.trim();
    if value.is_empty() {
        return None;
    }
    Some((name.to_ascii_lowercase(), value))
}

/// Removes a line continuation: the escape character as the last character other than
/// spaces and tabs. Returns the line without it and whether the next line continues it.
fn cut_continuation(s: &str, esc: char) -> (&str, bool) {
    let t = s.trim_end_matches([' ', '\t']);
    match t.strip_suffix(esc) {
        Some(x) => (x, true),
        None => (s, false),
    }
}

/// BuildKit's leading `--flag[=value]` words after the keyword, up to the first word that
/// does not start with `--` (or a lone `--`). Quotes and `\` work inside a flag word, as in
/// BuildKit. Returns the flags and the byte offset where the arguments start.
fn extract_flags(s: &str, from: usize) -> (Vec<Flag>, usize) {
    let mut flags = Vec::new();
    let mut pos = from;
    loop {
        let rest = s.get(pos..).unwrap_or("");
        let word = rest.trim_start();
        let at = pos + (rest.len() - word.len());
        if !word.starts_with("--") {
            return (flags, at);
        }
        let mut text = String::new();
        let mut quote: Option<char> = None;
        let mut end = word.len();
        let mut chars = word.char_indices();
        while let Some((i, c)) = chars.next() {
            match quote {
                None if c.is_whitespace() => {
                    end = i;
                    break;
                }
                None if c == '\'' || c == '"' => quote = Some(c),
                Some(q) if c == q => quote = None,
                _ if c == '\\' => {
                    if let Some((_, n)) = chars.next() {
                        text.push(n);
                    }
                }
                _ => text.push(c),
            }
        }
        pos = at + end;
        if text == "--" {
            return (flags, pos);
        }
        let body = text.get(2..).unwrap_or("");
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (body.to_string(), None),
        };
        flags.push(Flag { name, value, at });
    }
}

/// Words separated by Docker's blanks, quotes not special: `(byte offset + base, word)`.
fn split_blank(s: &str, base: usize) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    for (i, c) in s.char_indices() {
        if is_blank(c) {
            if let Some(st) = start.take()
                && let Some(w) = s.get(st..i)
            {
                out.push((base + st, w));
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(st) = start
        && let Some(w) = s.get(st..)
    {
        out.push((base + st, w));
    }
    out
}

/// The byte ranges of whitespace-separated words where quotes and the escape character keep
/// whitespace inside a word (Docker's `parseWords`, for ENV, LABEL and ARG). The words keep
/// their quotes; [`unquote`] removes them.
fn word_bounds(s: &str, esc: char) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    let mut quote: Option<char> = None;
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        if start.is_none() {
            if c.is_whitespace() {
                continue;
            }
            start = Some(i);
        }
        match quote {
            Some(q) => {
                if c == q {
                    quote = None;
                } else if c == esc && q != '\'' {
                    chars.next();
                }
            }
            None => {
                if c.is_whitespace() {
                    if let Some(st) = start.take() {
                        out.push((st, i));
                    }
                } else if c == '\'' || c == '"' {
                    quote = Some(c);
                } else if c == esc {
                    chars.next();
                }
            }
        }
    }
    if let Some(st) = start {
        out.push((st, s.len()));
    }
    out
}

/// The output of [`unquote`]: text in [`expand`]'s input syntax.
struct Unquoted {
    s: String,
    esc: char,
    /// `${` opened by the file and not yet closed: a literal `}` in there must not close it.
    depth: usize,
    /// The last character was a `$` from the file (not quoted or escaped).
    after_dollar: bool,
}

impl Unquoted {
    /// A character that was quoted or escaped in the file: it must come out of [`expand`]
    /// as itself.
    fn literal(&mut self, c: char) {
        if c == '$' || c == self.esc || (c == '}' && self.depth > 0) {
            self.s.push(self.esc);
        }
        self.s.push(c);
        self.after_dollar = false;
    }

    /// A character as the file has it, outside single quotes and not escaped: `$`, `${` and
    /// its `}` keep their meaning for [`expand`].
    fn syntax(&mut self, c: char) {
        match c {
            '{' if self.after_dollar => self.depth += 1,
            '}' if self.depth > 0 => self.depth -= 1,
            _ => {}
        }
        self.after_dollar = c == '$';
        self.s.push(c);
    }

    /// A quote or escape starts or ends here. Docker reads a `$` followed by one as a literal
    /// `$` (no name follows), so it is escaped; else `$"A"` would expand `$A` later.
    fn boundary(&mut self) {
        if self.after_dollar {
            self.s.pop();
            self.s.push(self.esc);
            self.s.push('$');
            self.after_dollar = false;
        }
    }
}

/// Docker's quote removal for a word it expands (its shell lexer, minus the expansion):
/// single quotes keep everything literally; double quotes keep everything but `$`, and the
/// escape character escapes `"`, `$` and itself there (before anything else it stays);
/// outside quotes the escape character makes the next character literal. The result is in
/// [`expand`]'s input syntax (see [`Unquoted`]). Error: `(byte offset in raw, message)`.
fn unquote(raw: &str, esc: char) -> Result<String, (usize, String)> {
    let mut out = Unquoted {
        s: String::with_capacity(raw.len()),
        esc,
        depth: 0,
        after_dollar: false,
    };
    let mut chars = raw.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == esc {
            out.boundary();
            // a lone escape character at the end is dropped, as by Docker
            if let Some((_, n)) = chars.next() {
                out.literal(n);
            }
        } else if c == '\'' {
            out.boundary();
            let mut closed = false;
            for (_, q) in chars.by_ref() {
                if q == '\'' {
                    closed = true;
                    break;
                }
                out.literal(q);
            }
            if !closed {
                return Err((i, "unterminated single quote".to_string()));
            }
        } else if c == '"' {
            out.boundary();
            let mut closed = false;
            while let Some((_, q)) = chars.next() {
                if q == '"' {
                    closed = true;
                    break;
                }
                if q == esc {
                    out.boundary();
                    match chars.peek() {
                        Some(&(_, n)) if n == '"' || n == '$' || n == esc => {
                            chars.next();
                            out.literal(n);
                        }
                        _ => out.literal(esc),
                    }
                } else {
                    out.syntax(q);
                }
            }
            if !closed {
                return Err((i, "unterminated double quote".to_string()));
            }
            out.boundary();
        } else {
            out.syntax(c);
        }
    }
    Ok(out.s)
}

enum Json {
    Strings(Vec<String>),
    /// A JSON array with something other than strings in it.
    NotStrings,
    /// Not a JSON array: the shell or word form.
    No,
}

/// The exec form as Docker decides it: the arguments start with `[` and are a JSON array.
fn json_array(s: &str) -> Json {
    if !s.starts_with('[') {
        return Json::No;
    }
    match serde_json::from_str::<Vec<serde_json::Value>>(s) {
        Ok(items) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    serde_json::Value::String(s) => out.push(s),
                    _ => return Json::NotStrings,
                }
            }
            Json::Strings(out)
        }
        Err(_) => Json::No,
    }
}

/// BuildKit's stage name rule, on the lowercased name.
fn valid_stage_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
}

/// An octal file mode up to 07777.
fn parse_mode(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    u32::from_str_radix(s, 8).ok().filter(|m| *m <= 0o7777)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ok(text: &str) -> Containerfile {
        match parse(text, Path::new("Containerfile")) {
            Ok(c) => c,
            Err(d) => panic!(
                "unexpected errors:\n{}",
                d.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        }
    }

    fn errs(text: &str) -> Vec<(usize, usize, String)> {
        match parse(text, Path::new("Containerfile")) {
            Ok(c) => panic!("parsed without errors: {c:#?}"),
            Err(d) => d.into_iter().map(|d| (d.line, d.col, d.message)).collect(),
        }
    }

    /// The one error of `text`, as (line, col), checking its message contains `needle`.
    fn one_err(text: &str, needle: &str) -> (usize, usize) {
        let e = errs(text);
        assert_eq!(e.len(), 1, "{e:#?}");
        assert!(
            e[0].2.contains(needle),
            "{:?} does not contain {needle:?}",
            e[0].2
        );
        (e[0].0, e[0].1)
    }

    fn kinds(c: &Containerfile, stage: usize) -> Vec<Kind> {
        c.stages[stage]
            .instructions
            .iter()
            .map(|i| i.kind.clone())
            .collect()
    }

    fn s(x: &str) -> String {
        x.to_string()
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(k, v)| (s(k), s(v))).collect()
    }

    fn vars(map: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = map.iter().map(|(k, v)| (s(k), s(v))).collect();
        move |k: &str| m.get(k).cloned()
    }

    fn ex(x: &str, map: &[(&str, &str)]) -> Result<String, String> {
        expand(x, '\\', &vars(map))
    }

    const MULTI: &str = "\
# syntax=docker/dockerfile:1
# escape=\\
ARG BASE=alpine:3.20
ARG TAG
FROM ${BASE} AS Build
ARG VERSION=1.0
ENV GOPATH=/go PATH=\"/go/bin:$PATH\"
LABEL org.opencontainers.image.title=\"berth test\" version=$VERSION
WORKDIR /src
COPY --chown=1000:1000 --chmod=0644 go.mod go.sum ./
ADD https://example.com/a.tar.gz /tmp/
run apk add --no-cache \\
  git \\
  make
USER builder
EXPOSE 80 443/tcp $PORT
MAINTAINER someone <a@b.c>

FROM --platform=$BUILDPLATFORM scratch
COPY --from=build /src/app /app
CMD [\"/app\", \"--serve\"]
ENTRYPOINT /app
";

    #[test]
    fn multi_stage_with_every_instruction() {
        let c = ok(MULTI);
        assert_eq!(c.escape(), '\\');
        assert_eq!(
            c.global_args,
            vec![(s("BASE"), Some(s("alpine:3.20"))), (s("TAG"), None)]
        );
        assert_eq!(c.stages.len(), 2);
        let b = &c.stages[0];
        assert_eq!(
            (b.from.as_str(), b.name.as_deref(), b.line),
            ("${BASE}", Some("build"), 5)
        );
        assert_eq!(
            kinds(&c, 0),
            vec![
                Kind::Arg(s("VERSION"), Some(s("1.0"))),
                Kind::Env(pairs(&[("GOPATH", "/go"), ("PATH", "/go/bin:$PATH")])),
                Kind::Label(pairs(&[
                    ("org.opencontainers.image.title", "berth test"),
                    ("version", "$VERSION")
                ])),
                Kind::Workdir(s("/src")),
                Kind::Copy(Copy {
                    sources: vec![s("go.mod"), s("go.sum")],
                    dest: s("./"),
                    from: None,
                    chown: Some(s("1000:1000")),
                    chmod: Some(0o644),
                }),
                Kind::Add(Copy {
                    sources: vec![s("https://example.com/a.tar.gz")],
                    dest: s("/tmp/"),
                    from: None,
                    chown: None,
                    chmod: None,
                }),
                Kind::Run(Command::Shell(s("apk add --no-cache   git   make"))),
                Kind::User(s("builder")),
                Kind::Expose(vec![s("80"), s("443/tcp"), s("$PORT")]),
                Kind::Maintainer(s("someone <a@b.c>")),
            ]
        );
        let lines: Vec<usize> = b.instructions.iter().map(|i| i.line).collect();
        assert_eq!(lines, vec![6, 7, 8, 9, 10, 11, 12, 15, 16, 17]);
        assert_eq!(b.instructions[6].text, "run apk add --no-cache git make");
        assert_eq!(
            b.instructions[4].text,
            "COPY --chown=1000:1000 --chmod=0644 go.mod go.sum ./"
        );

        let f = &c.stages[1];
        assert_eq!(
            (f.from.as_str(), f.name.as_deref(), f.line),
            ("scratch", None, 19)
        );
        assert_eq!(
            kinds(&c, 1),
            vec![
                Kind::Copy(Copy {
                    sources: vec![s("/src/app")],
                    dest: s("/app"),
                    from: Some(s("build")),
                    chown: None,
                    chmod: None,
                }),
                Kind::Cmd(Command::Exec(vec![s("/app"), s("--serve")])),
                Kind::Entrypoint(Command::Shell(s("/app"))),
            ]
        );
    }

    #[test]
    fn continuations_with_comments_and_blank_lines() {
        let c = ok("FROM alpine\n\
                    RUN echo one \\\n\
                    # a comment inside\n\
                    \x20   && echo two \\\n\
                    \n\
                    \x20   && echo three\n\
                    RUN echo a\\\n\
                    b\n\
                    RUN x \\   \n\
                    \x20 # indented comment\n\
                    \x20 y\n\
                    \x20   env   A=1  \n");
        let i = &c.stages[0].instructions;
        assert_eq!(i.len(), 4);
        assert_eq!(i[0].line, 2);
        assert_eq!(i[0].text, "RUN echo one && echo two && echo three");
        assert_eq!(
            i[0].kind,
            Kind::Run(Command::Shell(s(
                "echo one     && echo two     && echo three"
            )))
        );
        assert_eq!((i[1].line, i[1].text.as_str()), (7, "RUN echo ab"));
        assert_eq!(i[1].kind, Kind::Run(Command::Shell(s("echo ab"))));
        // blanks after the escape character still continue the line
        assert_eq!((i[2].line, i[2].text.as_str()), (9, "RUN x y"));
        assert_eq!(i[2].kind, Kind::Run(Command::Shell(s("x   y"))));
        assert_eq!((i[3].line, i[3].text.as_str()), (12, "env   A=1"));
        assert_eq!(i[3].kind, Kind::Env(pairs(&[("A", "1")])));
    }

    #[test]
    fn backtick_escape_directive() {
        let c = ok("# escape=`\n\
                    FROM mcr.microsoft.com/windows/servercore:ltsc2022\n\
                    WORKDIR C:\\app\n\
                    COPY app.exe C:\\app\\\n\
                    RUN dir `\n\
                    \x20   C:\\app\n\
                    ENV P=\"C:\\Program Files\\x\" Q=a`$b R=`\"q`\"\n");
        assert_eq!(c.escape(), '`');
        assert_eq!(
            kinds(&c, 0),
            vec![
                Kind::Workdir(s("C:\\app")),
                Kind::Copy(Copy {
                    sources: vec![s("app.exe")],
                    dest: s("C:\\app\\"),
                    from: None,
                    chown: None,
                    chmod: None,
                }),
                Kind::Run(Command::Shell(s("dir     C:\\app"))),
                Kind::Env(pairs(&[
                    ("P", "C:\\Program Files\\x"),
                    ("Q", "a`$b"),
                    ("R", "\"q\"")
                ])),
            ]
        );
        assert_eq!(c.stages[0].instructions[2].text, "RUN dir C:\\app");
        assert_eq!(
            expand("a`$b", c.escape(), &vars(&[("b", "x")])),
            Ok(s("a$b"))
        );
    }

    #[test]
    fn directives_only_at_the_top() {
        // after a comment, `# escape=` is a comment
        let c = ok("# hello\n# escape=`\nFROM alpine\nRUN echo `\n");
        assert_eq!(c.escape(), '\\');
        assert_eq!(kinds(&c, 0), vec![Kind::Run(Command::Shell(s("echo `")))]);
        // after an empty line too
        assert_eq!(ok("\n# escape=`\nFROM a\n").escape(), '\\');
        // an unknown directive is a comment and ends the directives
        assert_eq!(ok("# foo=bar\n# escape=`\nFROM a\n").escape(), '\\');
        // spacing and case are free, and syntax/check are accepted
        let c = ok("#  Syntax = docker/dockerfile:1\n# check=skip=all\n#ESCAPE =`\nFROM a\n");
        assert_eq!(c.escape(), '`');
        // repeated or invalid
        assert_eq!(
            one_err("# escape=`\n# escape=\\\nFROM a\n", "only once"),
            (2, 1)
        );
        assert_eq!(one_err("# escape=x\nFROM a\n", "invalid escape"), (1, 1));
        assert_eq!(
            one_err("# syntax=a\n# syntax=b\nFROM a\n", "only once"),
            (2, 1)
        );
    }

    #[test]
    fn exec_and_shell_forms() {
        let c = ok("FROM a\n\
                    RUN [\"echo\", \"a b\"]\n\
                    RUN [ \"$x\" = y ] && echo yes\n\
                    CMD [\"a\", 'b']\n\
                    CMD [\"unterminated\"\n\
                    ENTRYPOINT []\n\
                    ENTRYPOINT   [\"/bin/sh\",\"-c\"]  \n\
                    CMD echo \"$HOME\"\n");
        assert_eq!(
            kinds(&c, 0),
            vec![
                Kind::Run(Command::Exec(vec![s("echo"), s("a b")])),
                Kind::Run(Command::Shell(s("[ \"$x\" = y ] && echo yes"))),
                Kind::Cmd(Command::Shell(s("[\"a\", 'b']"))),
                Kind::Cmd(Command::Shell(s("[\"unterminated\""))),
                Kind::Entrypoint(Command::Exec(vec![])),
                Kind::Entrypoint(Command::Exec(vec![s("/bin/sh"), s("-c")])),
                Kind::Cmd(Command::Shell(s("echo \"$HOME\""))),
            ]
        );
        assert_eq!(
            one_err("FROM a\nRUN [\"a\", 1]\n", "array of strings"),
            (2, 5)
        );
        assert_eq!(one_err("FROM a\nRUN []\n", "needs a command"), (2, 5));
        assert_eq!(one_err("FROM a\nRUN\n", "needs a command"), (2, 1));
        assert_eq!(one_err("FROM a\nCMD --x=1 a\n", "unknown flag --x"), (2, 5));
    }

    #[test]
    fn env_forms_quotes_and_escapes() {
        let c = ok("FROM a\n\
                    ENV k=v k2=\"v 2\" k3=v\\ 3 k4='$HOME' k5=\"a\\\"b\" k6=$HOME k7=\"C:\\\\dir\" k8=\"a\\b\"\n\
                    ENV LEGACY some value \"quoted\"\n\
                    ENV J='{\"a\":1}' E= K=${X:-'}'}\n");
        let k = kinds(&c, 0);
        assert_eq!(
            k[0],
            Kind::Env(pairs(&[
                ("k", "v"),
                ("k2", "v 2"),
                ("k3", "v 3"),
                ("k4", "\\$HOME"),
                ("k5", "a\"b"),
                ("k6", "$HOME"),
                ("k7", "C:\\\\dir"),
                ("k8", "a\\\\b"),
            ]))
        );
        assert_eq!(k[1], Kind::Env(pairs(&[("LEGACY", "some value quoted")])));
        assert_eq!(
            k[2],
            Kind::Env(pairs(&[("J", "{\"a\":1}"), ("E", ""), ("K", "${X:-\\}}")]))
        );
        // what the builder gets after expansion matches Docker's
        let v = vars(&[("HOME", "/root")]);
        let Kind::Env(env) = &k[0] else {
            unreachable!()
        };
        let got: Vec<String> = env
            .iter()
            .map(|(_, x)| expand(x, '\\', &v).unwrap_or_default())
            .collect();
        assert_eq!(
            got,
            [
                "v", "v 2", "v 3", "$HOME", "a\"b", "/root", "C:\\dir", "a\\b"
            ]
        );
        assert_eq!(ex("${X:-\\}}", &[]), Ok(s("}")));
        // `$` followed by a quote is a literal `$` in Docker
        let c = ok("FROM a\nENV A=$\"B\" C=\"$\"D\n");
        let k = kinds(&c, 0);
        let Kind::Env(env) = &k[0] else {
            unreachable!()
        };
        let got: Vec<String> = env
            .iter()
            .map(|(_, x)| ex(x, &[("B", "no"), ("D", "no")]).unwrap_or_default())
            .collect();
        assert_eq!(got, ["$B", "$D"]);

        assert_eq!(one_err("FROM a\nENV A=1 B\n", "expected key=value"), (2, 9));
        assert_eq!(one_err("FROM a\nENV A\n", "no value"), (2, 5));
        assert_eq!(one_err("FROM a\nENV =x\n", "empty name"), (2, 5));
        assert_eq!(
            one_err("FROM a\nENV A=\"x y\n", "unterminated double quote"),
            (2, 7)
        );
        assert_eq!(
            one_err("FROM a\nENV A=it's\n", "unterminated single quote"),
            (2, 9)
        );
        assert_eq!(one_err("FROM a\nLABEL a b\n", "key=value"), (2, 7));
    }

    #[test]
    fn arg_forms() {
        let c = ok("ARG A\nARG B=\"x y\"\nFROM a\nARG C D=1\nARG E=\n");
        assert_eq!(
            c.global_args,
            vec![(s("A"), None), (s("B"), Some(s("x y")))]
        );
        let i = &c.stages[0].instructions;
        assert_eq!(
            kinds(&c, 0),
            vec![
                Kind::Arg(s("C"), None),
                Kind::Arg(s("D"), Some(s("1"))),
                Kind::Arg(s("E"), Some(s(""))),
            ]
        );
        assert_eq!(
            (i[0].text.as_str(), i[1].text.as_str()),
            ("ARG C", "ARG D=1")
        );
        assert_eq!(one_err("FROM a\nARG\n", "needs a name"), (2, 1));
        assert_eq!(one_err("FROM a\nARG =1\n", "needs a name"), (2, 5));
    }

    #[test]
    fn copy_flags_and_json_form() {
        let c = ok("FROM a AS base\n\
                    FROM b\n\
                    COPY --from=base --chown=app:app --chmod=755 [\"src one\", \"src2\", \"/dst/\"]\n\
                    ADD --chmod=0600 a.txt b.txt /x/\n\
                    COPY \"quoted\" '/y'\n\
                    COPY --chown=\"a b\" -- --weird /z\n\
                    COPY [abc] /glob/\n");
        assert_eq!(
            kinds(&c, 1),
            vec![
                Kind::Copy(Copy {
                    sources: vec![s("src one"), s("src2")],
                    dest: s("/dst/"),
                    from: Some(s("base")),
                    chown: Some(s("app:app")),
                    chmod: Some(0o755),
                }),
                Kind::Add(Copy {
                    sources: vec![s("a.txt"), s("b.txt")],
                    dest: s("/x/"),
                    from: None,
                    chown: None,
                    chmod: Some(0o600),
                }),
                Kind::Copy(Copy {
                    sources: vec![s("quoted")],
                    dest: s("/y"),
                    from: None,
                    chown: None,
                    chmod: None,
                }),
                Kind::Copy(Copy {
                    sources: vec![s("--weird")],
                    dest: s("/z"),
                    from: None,
                    chown: Some(s("a b")),
                    chmod: None,
                }),
                Kind::Copy(Copy {
                    sources: vec![s("[abc]")],
                    dest: s("/glob/"),
                    from: None,
                    chown: None,
                    chmod: None,
                }),
            ]
        );
        assert_eq!(one_err("FROM a\nCOPY --chmod=999 a b\n", "octal"), (2, 6));
        assert_eq!(one_err("FROM a\nCOPY --chmod=17777 a b\n", "octal"), (2, 6));
        assert_eq!(
            one_err("FROM a\nCOPY --link a b\n", "COPY --link is not supported"),
            (2, 6)
        );
        assert_eq!(
            one_err("FROM a\nADD --from=x a b\n", "ADD --from is not supported"),
            (2, 5)
        );
        assert_eq!(
            one_err("FROM a\nCOPY --from a b\n", "needs a value"),
            (2, 6)
        );
        assert_eq!(
            one_err("FROM a\nCOPY --from=x --from=y a b\n", "twice"),
            (2, 15)
        );
        assert_eq!(
            one_err("FROM a\nCOPY [\"a\"]\n", "at least one source"),
            (2, 1)
        );
        assert_eq!(one_err("FROM a\nCOPY a \"b\n", "unterminated"), (2, 8));
    }

    #[test]
    fn errors_with_positions() {
        assert_eq!(
            one_err(
                "FROM a\n  ONBUILD RUN x\n",
                "unsupported instruction ONBUILD"
            ),
            (2, 3)
        );
        assert_eq!(
            one_err("FROM a\nfoo bar\n", "unsupported instruction foo"),
            (2, 1)
        );
        assert_eq!(one_err("RUN x\nFROM a\n", "before the first FROM"), (1, 1));
        assert_eq!(
            one_err("FROM a AS x\nFROM b AS X\n", "duplicate stage name x"),
            (2, 11)
        );
        assert_eq!(
            one_err("FROM a\nCOPY onlyone\n", "at least one source"),
            (2, 1)
        );
        assert_eq!(
            one_err(
                "FROM a\nRUN --mount=type=cache,target=/x make\n",
                "RUN --mount is not supported"
            ),
            (2, 5)
        );
        assert_eq!(one_err("FROM a\nWORKDIR\n", "WORKDIR needs a path"), (2, 1));
        assert_eq!(one_err("FROM a\nUSER   \n", "USER needs a user"), (2, 1));
        assert_eq!(one_err("FROM a\nEXPOSE\n", "EXPOSE needs a port"), (2, 1));
        assert_eq!(one_err("FROM a AS 1x\n", "invalid stage name"), (1, 11));
        assert_eq!(one_err("FROM a b\n", "optionally AS name"), (1, 8));
        assert_eq!(one_err("FROM\n", "needs an image"), (1, 1));
        assert_eq!(one_err("", "no FROM"), (1, 1));
        assert_eq!(one_err("# just a comment\nARG A\n", "no FROM"), (1, 1));
        // a column on a continuation line points into that line
        assert_eq!(
            one_err(
                "FROM a\nCOPY --chown=x \\\n   --bogus=1 a b\n",
                "unknown flag --bogus"
            ),
            (3, 4)
        );
        // columns count characters, not bytes
        assert_eq!(one_err("FROM a\nENV é=1 ü\n", "expected key=value"), (2, 9));
    }

    #[test]
    fn several_errors_reported_together() {
        let text = "ARG X\n\
                    RUN echo hi\n\
                    FROM alpine AS one\n\
                    \x20 FOO bar\n\
                    FROM busybox AS One\n\
                    COPY onlyone\n\
                    RUN --mount=type=cache,target=/x make\n\
                    ENV A=\"x\n";
        let e = errs(text);
        let at: Vec<(usize, usize)> = e.iter().map(|e| (e.0, e.1)).collect();
        assert_eq!(
            at,
            vec![(2, 1), (4, 3), (5, 17), (6, 1), (7, 5), (8, 7)],
            "{e:#?}"
        );
        assert!(e[0].2.contains("RUN before the first FROM"));
        assert!(e[1].2.contains("unsupported instruction FOO"));
        assert!(e[2].2.contains("duplicate stage name one"));
        assert!(e[3].2.contains("COPY needs at least one source"));
        assert_eq!(e[4].2, "RUN --mount is not supported");
        assert!(e[5].2.contains("unterminated"));
        let shown = parse(text, Path::new("dir/Containerfile"))
            .err()
            .map(|d| d[0].to_string());
        assert_eq!(
            shown.as_deref(),
            Some("dir/Containerfile:2:1: RUN before the first FROM: only ARG may come before FROM")
        );
    }

    #[test]
    fn heredoc_reported_once_and_body_skipped() {
        let e = errs(
            "FROM a\nRUN <<EOF\nnot an instruction\nEOF\nRUN <<-'END' cat\n\tbody\n\tEND\nRUN ok\n",
        );
        assert_eq!(e.len(), 2, "{e:#?}");
        assert_eq!((e[0].0, e[0].1), (2, 5));
        assert_eq!((e[1].0, e[1].1), (5, 5));
        assert!(e[0].2.contains("heredocs"));
        // `<<<` and quoted `<<` are not heredocs
        ok("FROM a\nRUN cat <<< word && echo \"<<EOF\"\n");
    }

    #[test]
    fn keywords_any_case_and_stage_names() {
        let c = ok("from a as Build.Stage-1_x\nRuN x\nFrOm build.stage-1_x\n");
        assert_eq!(c.stages[0].name.as_deref(), Some("build.stage-1_x"));
        assert_eq!(c.stages[1].from, "build.stage-1_x");
        assert_eq!(c.stages[0].instructions[0].text, "RuN x");
    }

    #[test]
    fn bom_crlf_and_leading_blanks() {
        let c = ok("\u{feff}# escape=`\r\nFROM a\r\n   RUN x `\r\n  y\r\n");
        assert_eq!(c.escape(), '`');
        assert_eq!(kinds(&c, 0), vec![Kind::Run(Command::Shell(s("x   y")))]);
    }

    #[test]
    fn bounds() {
        let big = format!("FROM a\nRUN {}\n", "x".repeat(MAX_BYTES));
        assert_eq!(one_err(&big, "1 MiB"), (1, 1));
        let many = format!("FROM a\n{}", "RUN x\n".repeat(MAX_INSTRUCTIONS));
        assert_eq!(one_err(&many, "more than 10000"), (MAX_INSTRUCTIONS + 1, 1));
        let fine = format!("FROM a\n{}", "RUN x\n".repeat(MAX_INSTRUCTIONS - 1));
        assert_eq!(ok(&fine).stages[0].instructions.len(), MAX_INSTRUCTIONS - 1);
        // a file of nothing but bad words: the report is bounded
        let junk = "junk\n".repeat(5_000);
        let e = errs(&junk);
        assert_eq!(e.len(), MAX_DIAGNOSTICS + 1);
        assert!(e[MAX_DIAGNOSTICS].2.contains("more problems not shown"));
    }

    #[test]
    fn expand_forms() {
        let v: &[(&str, &str)] = &[("A", "1"), ("E", ""), ("_x9", "u"), ("P", "a b")];
        assert_eq!(
            ex("$A ${A} ${A:-d} ${B:-d} ${A:+alt} ${B:+alt}.", v),
            Ok(s("1 1 1 d alt ."))
        );
        assert_eq!(ex("${E:-d}|${E:+x}|$E|$_x9$A", v), Ok(s("d|||u1")));
        assert_eq!(
            ex("${B:-${A}x} ${B:-${C:-deep $P}} ${A:+${A}${A}}", v),
            Ok(s("1x deep a b 11"))
        );
        assert_eq!(ex("$Ab ${A}b $A-b $A.b", v), Ok(s(" 1b 1-b 1.b")));
        assert_eq!(
            ex("\\$A \\${A} x\\\\y a\\b end\\", v),
            Ok(s("$A ${A} x\\y ab end"))
        );
        assert_eq!(ex("$ a$ $- $1 ${10} $$", v), Ok(s("$ a$ $-   $$")));
        assert_eq!(ex("no vars", v), Ok(s("no vars")));
        assert_eq!(ex("${UNKNOWN}|$UNKNOWN", v), Ok(s("|")));
        assert_eq!(expand("`$A ${A} \\$A", '`', &vars(v)), Ok(s("$A 1 \\1")));
        // errors
        for bad in [
            "${A",
            "${A:-x",
            "${A:",
            "${",
            "${a:?x}",
            "${a:=x}",
            "${}",
            "${1a}",
            "${a b}",
            "${-}",
            "${A-x}",
            "${B:-${C}",
        ] {
            assert!(ex(bad, v).is_err(), "{bad:?} should fail: {:?}", ex(bad, v));
        }
        assert!(
            ex("${A:?x}", v)
                .err()
                .is_some_and(|e| e.contains("unsupported"))
        );
        // nesting is bounded, not a stack overflow
        let deep = format!("{}x{}", "${A:+".repeat(10_000), "}".repeat(10_000));
        assert!(ex(&deep, v).is_err());
        let ok_deep = format!(
            "{}x{}",
            "${A:+".repeat(MAX_NESTING),
            "}".repeat(MAX_NESTING)
        );
        assert_eq!(ex(&ok_deep, v), Ok(s("x")));
    }

    /// Every prefix of a complex file, and random strings, parse (or fail) without a panic.
    #[test]
    fn never_panics() {
        let complex = format!(
            "{MULTI}\n# escape=`\nRUN <<EOF\nbody\nEOF\nENV a=\"b\\\" c='d' e=${{f:-'}}'}} g=\\\nFROM x AS y\nCOPY [\"a\", 1]\nCOPY --chmod=7 [\"é\", \"ü\"]\nLABEL \"k\"='v'\nARG z=\"\nEXPOSE '80\nonbuild RUN x\n  \\\n\n"
        );
        let mut boundaries: Vec<usize> = complex.char_indices().map(|(i, _)| i).collect();
        boundaries.push(complex.len());
        for end in boundaries {
            let prefix = &complex[..end];
            let _ = parse(prefix, Path::new("f"));
            let _ = expand(prefix, '\\', &|_: &str| Some(s("v")));
        }
        let alphabet: Vec<char> = "\\`\"'$ {}:-+?=#[]\n\r\t,0aZé<-".chars().collect();
        let words = [
            "FROM ",
            "RUN ",
            "COPY ",
            "ENV ",
            "ARG ",
            "LABEL ",
            "--from=",
            "AS ",
            "<<E",
            "# escape=`\n",
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..3_000 {
            let len = (next() % 120) as usize;
            let mut t = String::new();
            for _ in 0..len {
                let r = next();
                if r % 5 == 0 {
                    t.push_str(words[(r / 5 % words.len() as u64) as usize]);
                } else {
                    t.push(alphabet[(r / 5 % alphabet.len() as u64) as usize]);
                }
            }
            let _ = parse(&t, Path::new("f"));
            let _ = expand(&t, '`', &|_: &str| None);
            let bytes: Vec<u8> = (0..len).map(|_| (next() & 0xff) as u8).collect();
            let lossy = String::from_utf8_lossy(&bytes);
            let _ = parse(&lossy, Path::new("f"));
            let _ = expand(&lossy, '\\', &|_: &str| None);
        }
    }
}
