//! Git sources via git2: resolve a ref to a commit, fetch just that ref,
//! check it out; and the clean/dirty state of a local tree.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use git2::{build::CheckoutBuilder, Direction, FetchOptions, Oid, Remote, Repository, StatusOptions};

use crate::progress::detail_or_note;

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Asks the remote which commit `git_ref` names, without fetching objects.
/// `None` when only a fetch can tell (a short commit id nothing advertises).
pub fn resolve_remote(url: &str, git_ref: &str) -> Result<Option<Oid>> {
    if git_ref.len() == 40 && is_hex(git_ref) {
        return Ok(Some(Oid::from_str(git_ref)?));
    }
    let mut remote = Remote::create_detached(url)?;
    remote.connect(Direction::Fetch).with_context(|| format!("cannot reach git remote {url}"))?;
    let heads: Vec<(String, Oid)> = remote.list()?.iter().map(|h| (h.name().to_string(), h.oid())).collect();
    let _ = remote.disconnect();
    let find = |name: &str| heads.iter().find(|(n, _)| n == name).map(|(_, o)| *o);
    // Peeled annotated tag first, so the key names the commit, not the tag object.
    for name in [
        format!("refs/tags/{git_ref}^{{}}"),
        format!("refs/tags/{git_ref}"),
        format!("refs/heads/{git_ref}"),
        format!("{git_ref}^{{}}"),
        git_ref.to_string(),
    ] {
        if let Some(o) = find(&name) {
            return Ok(Some(o));
        }
    }
    if git_ref.len() >= 4 && is_hex(git_ref) {
        let lower = git_ref.to_ascii_lowercase();
        let mut hits: Vec<Oid> = heads.iter().map(|(_, o)| *o).filter(|o| o.to_string().starts_with(&lower)).collect();
        hits.sort();
        hits.dedup();
        if hits.len() == 1 {
            return Ok(Some(hits[0]));
        }
        return Ok(None);
    }
    bail!("git ref {git_ref:?} not found at {url} (no such tag or branch)")
}

fn fetch(repo: &Repository, url: &str, refspecs: &[String], depth: Option<i32>) -> Result<(), git2::Error> {
    let mut remote = repo.remote_anonymous(url)?;
    let mut fo = FetchOptions::new();
    if let Some(d) = depth {
        fo.depth(d);
    }
    fo.download_tags(git2::AutotagOption::None);
    let specs: Vec<&str> = refspecs.iter().map(String::as_str).collect();
    remote.fetch(&specs, Some(&mut fo), None)
}

/// Clones just what `git_ref` needs into the new directory `dest` and checks
/// it out. `want` is the commit [`resolve_remote`] found, if any. Returns the
/// commit id checked out.
pub fn fetch_checkout(url: &str, git_ref: &str, want: Option<Oid>, dest: &Path) -> Result<Oid> {
    if let Some(oid) = borrow_local(url, git_ref, want, dest)? {
        return Ok(oid);
    }
    let repo = Repository::init(dest).with_context(|| format!("git init {}", dest.display()))?;
    detail_or_note(format!("fetching {git_ref} from {url}"));
    let narrow = match want {
        Some(o) if git_ref.len() == 40 => vec![format!("+{o}:refs/ktstr/want")],
        _ => vec![
            format!("+refs/tags/{git_ref}:refs/tags/{git_ref}"),
            format!("+refs/heads/{git_ref}:refs/ktstr/want"),
        ],
    };
    let wide = vec!["+refs/heads/*:refs/remotes/origin/*".to_string(), "+refs/tags/*:refs/tags/*".to_string()];
    // Shallow first; not every transport does depth or fetch-by-id, so widen
    // step by step (a missing ref in a refspec is not an error in libgit2).
    let attempts: [(&Vec<String>, Option<i32>); 3] = [(&narrow, Some(1)), (&narrow, None), (&wide, None)];
    let mut last_err = None;
    let mut commit = None;
    for (specs, depth) in attempts {
        match fetch(&repo, url, specs, depth) {
            Ok(()) => {
                commit = find_commit(&repo, git_ref, want);
                if commit.is_some() {
                    break;
                }
            }
            Err(e) => last_err = Some(e),
        }
    }
    let Some(oid) = commit else {
        return Err(match last_err {
            Some(e) => anyhow!("cannot fetch {git_ref} from {url}: {}", e.message()),
            None => anyhow!("git ref {git_ref:?} not found at {url}"),
        });
    };
    let obj = repo.find_object(oid, None)?;
    repo.checkout_tree(&obj, Some(CheckoutBuilder::new().force()))
        .with_context(|| format!("checking out {oid}"))?;
    repo.set_head_detached(oid)?;
    Ok(oid)
}

/// For a `file://` repository, borrow its objects through `alternates`
/// (like `git clone --shared`) instead of packing and copying them: the
/// checkout only lives as long as the build. `None` when `url` is not local.
fn borrow_local(url: &str, git_ref: &str, want: Option<Oid>, dest: &Path) -> Result<Option<Oid>> {
    let Some(path) = url.strip_prefix("file://") else { return Ok(None) };
    let Ok(src) = Repository::open(path) else { return Ok(None) };
    let oid = match want {
        Some(o) => o,
        None => find_commit(&src, git_ref, None).ok_or_else(|| anyhow!("git ref {git_ref:?} not found at {url}"))?,
    };
    let objects = src.path().join("objects").canonicalize()?;
    Repository::init(dest).with_context(|| format!("git init {}", dest.display()))?;
    let alternates = dest.join(".git/objects/info/alternates");
    std::fs::create_dir_all(alternates.parent().unwrap())?;
    std::fs::write(&alternates, format!("{}\n", objects.display()))?;
    // Reopened so libgit2 reads the alternates file.
    let repo = Repository::open(dest)?;
    detail_or_note(format!("checking out {oid} from {url} (shared objects)"));
    let obj = repo.find_commit(oid).with_context(|| format!("commit {oid} not in {url}"))?.into_object();
    repo.checkout_tree(&obj, Some(CheckoutBuilder::new().force()))
        .with_context(|| format!("checking out {oid}"))?;
    repo.set_head_detached(oid)?;
    Ok(Some(oid))
}

fn find_commit(repo: &Repository, git_ref: &str, want: Option<Oid>) -> Option<Oid> {
    if let Some(o) = want {
        return repo.find_commit(o).ok().map(|c| c.id());
    }
    for name in [
        format!("refs/tags/{git_ref}"),
        "refs/ktstr/want".to_string(),
        format!("refs/remotes/origin/{git_ref}"),
        git_ref.to_string(),
    ] {
        if let Ok(obj) = repo.revparse_single(&name) {
            if let Ok(c) = obj.peel_to_commit() {
                return Some(c.id());
            }
        }
    }
    None
}

/// Git state of a local source tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeState {
    NotGit,
    Dirty,
    Clean { commit: String },
}

/// Clean means: `dir` is the work tree root of a repository with no modified,
/// staged or untracked (non-ignored) files. Kernel build outputs are ignored.
pub fn tree_state(dir: &Path) -> TreeState {
    // open(), not discover(): a tree inside some other repo is not "in git".
    let Ok(repo) = Repository::open(dir) else { return TreeState::NotGit };
    let same_root = match (repo.workdir().and_then(|w| w.canonicalize().ok()), dir.canonicalize().ok()) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    };
    if !same_root {
        return TreeState::NotGit;
    }
    let Ok(head) = repo.head().and_then(|h| h.peel_to_commit()) else { return TreeState::Dirty };
    let mut so = StatusOptions::new();
    so.include_untracked(true).recurse_untracked_dirs(false).include_ignored(false).exclude_submodules(true);
    let clean = repo.statuses(Some(&mut so)).map(|st| st.is_empty()).unwrap_or(false);
    if clean {
        TreeState::Clean { commit: head.id().to_string() }
    } else {
        TreeState::Dirty
    }
}

/// `(owner, repo)` from a git URL's last two path parts, `.git` stripped.
pub fn owner_repo(url: &str) -> (String, String) {
    let path = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let path = path.trim_end_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path);
    let mut parts = path.rsplit(['/', ':']).filter(|p| !p.is_empty());
    let repo = parts.next().unwrap_or("repo").to_string();
    let owner = parts.next().unwrap_or("local").to_string();
    (owner, repo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners() {
        assert_eq!(owner_repo("https://github.com/sched-ext/sched_ext.git"), ("sched-ext".into(), "sched_ext".into()));
        assert_eq!(owner_repo("https://git.kernel.org/pub/scm/linux/kernel/git/tj/sched_ext.git/"), ("tj".into(), "sched_ext".into()));
        assert_eq!(owner_repo("file:///srv/linux"), ("srv".into(), "linux".into()));
        assert_eq!(owner_repo("git@github.com:me/linux.git"), ("me".into(), "linux".into()));
    }

    fn commit_file(repo: &Repository, name: &str, body: &str, msg: &str) -> Oid {
        let wd = repo.workdir().unwrap().to_path_buf();
        std::fs::write(wd.join(name), body).unwrap();
        let mut idx = repo.index().unwrap();
        idx.add_path(Path::new(name)).unwrap();
        idx.write().unwrap();
        let tree = repo.find_tree(idx.write_tree().unwrap()).unwrap();
        let sig = git2::Signature::now("t", "t@t").unwrap();
        let parent = repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        repo.commit(Some("HEAD"), &sig, &sig, msg, &tree, &parents).unwrap()
    }

    #[test]
    fn resolve_and_fetch_refs() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let repo = Repository::init(&src).unwrap();
        let c0 = commit_file(&repo, "Makefile", "zero\n", "c0");
        let c1 = commit_file(&repo, "Makefile", "one\n", "c1");
        let sig = git2::Signature::now("t", "t@t").unwrap();
        repo.tag("v1", &repo.find_object(c1, None).unwrap(), &sig, "annotated", false).unwrap();
        let c2 = commit_file(&repo, "Makefile", "two\n", "c2");
        let branch = repo.head().unwrap().shorthand().unwrap().to_string();
        let file_url = format!("file://{}", src.display());
        let plain_url = src.display().to_string();

        assert_eq!(resolve_remote(&file_url, "v1").unwrap(), Some(c1), "annotated tag peels to its commit");
        assert_eq!(resolve_remote(&file_url, &branch).unwrap(), Some(c2));
        assert_eq!(resolve_remote(&file_url, &c1.to_string()).unwrap(), Some(c1));
        assert_eq!(resolve_remote(&file_url, &c2.to_string()[..7]).unwrap(), Some(c2), "advertised short id");
        assert_eq!(resolve_remote(&file_url, &c0.to_string()[..7]).unwrap(), None, "needs a fetch");
        assert!(resolve_remote(&file_url, "no-such-ref").is_err());

        for (i, (url, r, want, expect, body)) in [
            (&file_url, "v1", Some(c1), c1, "one\n"),
            (&file_url, &c0.to_string()[..7], None, c0, "zero\n"),
            (&plain_url, "v1", Some(c1), c1, "one\n"),
            (&plain_url, branch.as_str(), Some(c2), c2, "two\n"),
            (&plain_url, &c0.to_string()[..7], None, c0, "zero\n"),
        ]
        .into_iter()
        .enumerate()
        {
            let dest = d.path().join(format!("out{i}"));
            assert_eq!(fetch_checkout(url, r, want, &dest).unwrap(), expect, "{url} {r}");
            assert_eq!(std::fs::read_to_string(dest.join("Makefile")).unwrap(), body);
        }
    }

    #[test]
    fn local_states() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(tree_state(d.path()), TreeState::NotGit);
        let repo = Repository::init(d.path()).unwrap();
        std::fs::write(d.path().join("Makefile"), "x\n").unwrap();
        assert_eq!(tree_state(d.path()), TreeState::Dirty);
        let mut idx = repo.index().unwrap();
        idx.add_path(Path::new("Makefile")).unwrap();
        idx.write().unwrap();
        let tree = repo.find_tree(idx.write_tree().unwrap()).unwrap();
        let sig = git2::Signature::now("t", "t@t").unwrap();
        let c = repo.commit(Some("HEAD"), &sig, &sig, "m", &tree, &[]).unwrap();
        assert_eq!(tree_state(d.path()), TreeState::Clean { commit: c.to_string() });
        // A subdirectory of a repo is not a clean tree of its own.
        std::fs::create_dir(d.path().join("sub")).unwrap();
        assert_eq!(tree_state(&d.path().join("sub")), TreeState::NotGit);
    }
}
