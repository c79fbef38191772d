//! Process identity and priority: the title `ps` shows, the user and groups a process runs
//! as, its nice value and the CPUs it may run on.
//!
//! Everything here acts on the calling process (for the nice value and the CPU affinity, on
//! the calling thread: call them before starting threads, which inherit both).
//!
//! # The process title
//!
//! `ps` shows two things: the 15-byte `comm` (`/proc/<pid>/comm`, `ps -o comm`, `top`) and the
//! argument area (`/proc/<pid>/cmdline`, `ps -o args`, `ps aux`). [`set_process_title`] sets
//! both:
//!
//! - `comm` through `prctl(PR_SET_NAME)`, cut at a character boundary to 15 bytes;
//! - the argument area, found through fields 48 and 49 of `/proc/self/stat` (`arg_start`,
//!   `arg_end`: the very bytes the kernel reads for `/proc/<pid>/cmdline`), checked against
//!   `/proc/self/maps` to lie inside one readable and writable mapping, and overwritten in place
//!   with the title and zero padding up to its original length, the way nginx and PostgreSQL
//!   do. The last byte stays NUL, so the kernel never reads on into the environment. The
//!   environment strings that follow the arguments are never touched, so `environ` and
//!   `std::env::var` stay valid.
//!
//! Writing over the argument area changes what `std::env::args()` returns afterwards (it
//! reads the same memory), and glibc's `program_invocation_name`; read your arguments first. It is done only while the process has
//! a single thread, so that no other thread can be reading the arguments as they change.
//! A title longer than the original area, or any title in a process with more threads, is
//! written into a page of its own which the kernel is then told to show instead
//! (`prctl(PR_SET_MM_ARG_START/ARG_END)`, which needs `CAP_SYS_RESOURCE`). When that is not
//! permitted, a single-threaded process gets the title cut to the original area, and a
//! threaded one gets `comm` only. [`TitleOutcome`] says which was done.
//!
//! # Dropping privileges
//!
//! [`drop_privileges`] resolves a user and a group (by name or id) and then sets the
//! supplementary groups, the group and the user, in that order, and verifies the result: the
//! real, effective and saved ids are the new ones, the supplementary groups are exactly the
//! requested ones, and, when it started as root, `setuid(0)` now fails. Any failure is an
//! error, and the process is then in an unknown state between the old and the new identity:
//! **it must not go on** as if nothing happened. A child about to `exec` must `_exit` on
//! error, never run the program. [`PrivilegeDrop::resolve`] reads the user database (which
//! allocates and may load NSS modules) and can be done before `fork`; [`Credentials::apply`]
//! makes only system calls and is the part to run in the child.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::libc;
use nix::sched::CpuSet;
use nix::unistd::{Gid, Group, Pid, Uid, User};

/// The lowest (most favoured) nice value.
pub const NICE_MIN: i32 = -20;
/// The highest (least favoured) nice value.
pub const NICE_MAX: i32 = 19;

/// The most bytes of `comm` (the kernel's `TASK_COMM_LEN` less the NUL).
pub const COMM_MAX: usize = 15;

/// The most bytes of a title placed in a page of its own (the page less the final NUL).
const RELOCATED_MAX: usize = 4095;

/// What went wrong while changing the identity or priority of the process.
#[non_exhaustive]
#[derive(Debug)]
pub enum IdentityError {
    /// The title is empty or contains a NUL byte, which neither `comm` nor the argument area
    /// can hold.
    InvalidTitle,
    /// No user of this name or id exists in the user database (for an id: it was needed
    /// for the user's primary or supplementary groups).
    UnknownUser(UserSpec),
    /// No group of this name or id exists in the group database.
    UnknownGroup(String),
    /// A name contains a NUL byte and cannot be looked up.
    InvalidName(String),
    /// Reading the user or group database failed.
    Lookup(Errno),
    /// A call that changes credentials failed; the process may be half-way between the old
    /// and the new identity and must not continue.
    CredentialCall {
        /// Which call failed.
        call: CredentialCall,
        /// Why.
        errno: Errno,
    },
    /// After the drop, the credentials are not the requested ones; the process must not
    /// continue.
    Verification(CredentialMismatch),
    /// After dropping root, `setuid(0)` or `setgid(0)` succeeded: the drop was not permanent,
    /// and the process is privileged again. It must not continue.
    PrivilegesRegainable,
    /// A nice value outside [`NICE_MIN`]`..=`[`NICE_MAX`].
    NiceOutOfRange(i32),
    /// `setpriority` or `getpriority` failed (lowering the nice value needs `CAP_SYS_NICE`).
    Priority(Errno),
    /// An empty set of CPUs was asked for.
    EmptyCpuSet,
    /// A CPU index is beyond the CPUs this machine has.
    CpuOutOfRange {
        /// The index asked for.
        cpu: usize,
        /// How many CPUs the machine has (indices `0..n_cpus`).
        n_cpus: usize,
    },
    /// `sched_setaffinity` or `sched_getaffinity` failed.
    Affinity(Errno),
    /// `prctl` failed while setting `comm`.
    Prctl(Errno),
    /// Reading `/proc/self` failed or it had an unexpected shape.
    Proc(io::Error),
}

/// A call that changes credentials, named in [`IdentityError::CredentialCall`].
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialCall {
    /// `setgroups`: the supplementary groups.
    Setgroups,
    /// `setgid`: the real, effective and saved group id.
    Setgid,
    /// `setuid`: the real, effective and saved user id.
    Setuid,
    /// `getresuid`, `getresgid` or `getgroups`, while verifying.
    Query,
}

impl fmt::Display for CredentialCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Setgroups => "setgroups",
            Self::Setgid => "setgid",
            Self::Setuid => "setuid",
            Self::Query => "reading the credentials back",
        })
    }
}

/// What was found different from the request after a drop, in
/// [`IdentityError::Verification`].
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialMismatch {
    /// One of the real, effective or saved user ids is not the requested uid.
    Uid {
        /// The uid asked for.
        expected: u32,
        /// The first different id found.
        found: u32,
    },
    /// One of the real, effective or saved group ids is not the requested gid.
    Gid {
        /// The gid asked for.
        expected: u32,
        /// The first different id found.
        found: u32,
    },
    /// The supplementary groups are not exactly the requested set.
    Groups,
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidTitle => f.write_str("a process title must be non-empty and hold no NUL"),
            Self::UnknownUser(UserSpec::Name(u)) => write!(f, "no such user: {u}"),
            Self::UnknownUser(UserSpec::Id(uid)) => write!(f, "no user with uid {uid}"),
            Self::UnknownGroup(g) => write!(f, "no such group: {g}"),
            Self::InvalidName(n) => write!(f, "name contains a NUL byte: {n:?}"),
            Self::Lookup(e) => write!(f, "user/group database lookup failed: {e}"),
            Self::CredentialCall { call, errno } => {
                write!(f, "{call} failed while dropping privileges: {errno}")
            }
            Self::Verification(m) => match m {
                CredentialMismatch::Uid { expected, found } => {
                    write!(f, "after the drop a user id is {found}, not {expected}")
                }
                CredentialMismatch::Gid { expected, found } => {
                    write!(f, "after the drop a group id is {found}, not {expected}")
                }
                CredentialMismatch::Groups => f.write_str(
                    "after the drop the supplementary groups are not the requested ones",
                ),
            },
            Self::PrivilegesRegainable => f.write_str(
                "after dropping root, root could be regained: the drop is not permanent",
            ),
            Self::NiceOutOfRange(n) => {
                write!(f, "nice value {n} is outside {NICE_MIN}..={NICE_MAX}")
            }
            Self::Priority(e) => write!(f, "setting or reading the nice value failed: {e}"),
            Self::EmptyCpuSet => f.write_str("cannot pin to an empty set of CPUs"),
            Self::CpuOutOfRange { cpu, n_cpus } => {
                write!(
                    f,
                    "CPU {cpu} does not exist (this machine has CPUs 0..{n_cpus})"
                )
            }
            Self::Affinity(e) => write!(f, "setting or reading the CPU affinity failed: {e}"),
            Self::Prctl(e) => write!(f, "prctl failed: {e}"),
            Self::Proc(e) => write!(f, "reading /proc/self failed: {e}"),
        }
    }
}

impl std::error::Error for IdentityError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Lookup(e)
            | Self::CredentialCall { errno: e, .. }
            | Self::Priority(e)
            | Self::Affinity(e)
            | Self::Prctl(e) => Some(e),
            Self::Proc(e) => Some(e),
            _ => None,
        }
    }
}

impl From<IdentityError> for io::Error {
    fn from(e: IdentityError) -> Self {
        match e {
            IdentityError::Proc(e) => e,
            IdentityError::Lookup(errno)
            | IdentityError::CredentialCall { errno, .. }
            | IdentityError::Priority(errno)
            | IdentityError::Affinity(errno)
            | IdentityError::Prctl(errno) => Self::from(errno),
            IdentityError::UnknownUser(_) | IdentityError::UnknownGroup(_) => {
                Self::new(io::ErrorKind::NotFound, e)
            }
            IdentityError::Verification(_) | IdentityError::PrivilegesRegainable => {
                Self::new(io::ErrorKind::PermissionDenied, e)
            }
            _ => Self::new(io::ErrorKind::InvalidInput, e),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Process title
// ---------------------------------------------------------------------------------------

/// Where the argument-area part of a title went, in [`TitleOutcome`].
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgvTitle {
    /// Written over the original argument area, whole.
    InPlace,
    /// Written over the original argument area, cut to `kept` bytes: the area was too short
    /// and moving it was not permitted.
    Truncated {
        /// How many bytes of the title `ps` shows.
        kept: usize,
    },
    /// Written into a page of its own that the kernel now shows as the argument area
    /// (`PR_SET_MM_ARG_START`/`ARG_END`); cut to `kept` bytes if it was longer than a page.
    Relocated {
        /// How many bytes of the title `ps` shows.
        kept: usize,
    },
    /// The argument area was left alone; only `comm` changed.
    Unchanged(ArgvSkip),
}

/// Why the argument area was left alone, in [`ArgvTitle::Unchanged`].
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgvSkip {
    /// The process has several threads (one might be reading the arguments), and moving the
    /// area elsewhere was not permitted.
    MultiThreaded,
    /// `/proc/self/stat` does not show the area, or it is not inside one writable mapping,
    /// and moving it was not permitted.
    AreaUnavailable,
}

/// What [`set_process_title`] did.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TitleOutcome {
    /// How many bytes of the title `comm` holds (at most [`COMM_MAX`]).
    pub comm_len: usize,
    /// What happened to the argument area.
    pub argv: ArgvTitle,
}

/// The argument area as the kernel sees it: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ArgArea {
    start: usize,
    end: usize,
}

/// One title change at a time, in-process: the argument area and the relocation page are
/// written only under this lock.
static TITLE_LOCK: Mutex<()> = Mutex::new(());
/// The page a relocated title lives in (0 until first needed). Mapped once, never unmapped.
static RELOCATION_PAGE: AtomicUsize = AtomicUsize::new(0);

/// Sets the process title shown by `ps`, `top` and `/proc/<pid>/{comm,cmdline}`.
///
/// See the [module documentation](self) for how. The `comm` part is set for the main thread
/// (from another thread, by writing `/proc/self/comm`). Errors only when the title is empty
/// or holds a NUL, or when `comm` cannot be set; a title the argument area could not show is
/// reported in the [`TitleOutcome`], not as an error.
pub fn set_process_title(title: &str) -> Result<TitleOutcome, IdentityError> {
    if title.is_empty() || title.as_bytes().contains(&0) {
        return Err(IdentityError::InvalidTitle);
    }
    let _serial = TITLE_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let comm = cut_at_char_boundary(title, COMM_MAX);
    set_comm(comm)?;
    let argv = set_argv_title(title.as_bytes());
    Ok(TitleOutcome {
        comm_len: comm.len(),
        argv,
    })
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn cut_at_char_boundary(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn set_comm(comm: &str) -> Result<(), IdentityError> {
    let main_thread = nix::unistd::gettid() == nix::unistd::getpid();
    if main_thread {
        let c = CString::new(comm).map_err(|_| IdentityError::InvalidTitle)?;
        nix::sys::prctl::set_name(&c).map_err(IdentityError::Prctl)
    } else {
        // PR_SET_NAME names the calling thread; the process's name is the main thread's.
        std::fs::write("/proc/self/comm", comm).map_err(IdentityError::Proc)
    }
}

fn set_argv_title(title: &[u8]) -> ArgvTitle {
    let area = read_arg_area().ok();
    let page = RELOCATION_PAGE.load(Ordering::Acquire);
    if let Some(area) = area {
        if page != 0 && area.start == page {
            // Already relocated: rewrite our own page and move the end.
            return relocate(title, area)
                .unwrap_or(ArgvTitle::Unchanged(ArgvSkip::AreaUnavailable));
        }
    }
    let single_threaded = thread_count().is_ok_and(|n| n == 1);
    let writable = area.filter(|a| area_is_writable(*a));
    if let (true, Some(area)) = (single_threaded, writable) {
        if title.len() < area.end - area.start {
            write_in_place(area, title);
            return ArgvTitle::InPlace;
        }
    }
    if let Some(done) = area.and_then(|a| relocate(title, a)) {
        return done;
    }
    match (single_threaded, writable) {
        (true, Some(area)) => {
            let kept = cut_at_char_boundary_bytes(title, area.end - area.start - 1);
            write_in_place(area, &title[..kept]);
            ArgvTitle::Truncated { kept }
        }
        (false, _) => ArgvTitle::Unchanged(ArgvSkip::MultiThreaded),
        (true, None) => ArgvTitle::Unchanged(ArgvSkip::AreaUnavailable),
    }
}

/// Like [`cut_at_char_boundary`] over bytes known to be UTF-8 (they came from a `&str`).
fn cut_at_char_boundary_bytes(bytes: &[u8], max: usize) -> usize {
    if bytes.len() <= max {
        return bytes.len();
    }
    let mut end = max;
    // A UTF-8 continuation byte is 0b10xx_xxxx; a cut must not land before one.
    while end > 0 && (bytes[end] & 0xC0) == 0x80 {
        end -= 1;
    }
    end
}

/// Writes `title` (which is shorter than the area) at the start of the argument area and
/// zeroes the rest, so the area ends in NUL.
fn write_in_place(area: ArgArea, title: &[u8]) {
    let len = area.end - area.start;
    debug_assert!(title.len() < len);
    let base = area.start as *mut u8;
    // SAFETY: `area_is_writable` checked that `[start, end)` lies inside one mapping that is
    // readable and writable, and it is the argument area of this process, which no Rust
    // object owns: the standard library keeps only raw pointers into it and reads them
    // when `std::env::args()` is called, which cannot happen concurrently because the
    // process has one thread (checked by the caller) and title changes are serialised by
    // TITLE_LOCK. `title.len() < len`, so both writes stay inside the area.
    unsafe {
        std::ptr::copy_nonoverlapping(title.as_ptr(), base, title.len());
        std::ptr::write_bytes(base.add(title.len()), 0, len - title.len());
    }
}

/// Puts the title in the relocation page and points the kernel's argument area at it.
/// `None` when the page cannot be had or the kernel refuses (no `CAP_SYS_RESOURCE`).
fn relocate(title: &[u8], current: ArgArea) -> Option<ArgvTitle> {
    let page = relocation_page()?;
    let kept = cut_at_char_boundary_bytes(title, RELOCATED_MAX);
    // SAFETY: `page` is a private anonymous read-write mapping of 4096 bytes made by
    // `relocation_page` and never unmapped; no Rust reference to it exists (only its
    // address is stored) and it is written only under TITLE_LOCK, held by our caller.
    // `kept + 1 <= 4096`.
    unsafe {
        let base = page as *mut u8;
        std::ptr::copy_nonoverlapping(title.as_ptr(), base, kept);
        std::ptr::write_bytes(base.add(kept), 0, 4096 - kept);
    }
    let new = ArgArea {
        start: page,
        end: page + kept + 1,
    };
    // The kernel insists on start <= end after each call: order the two calls so it holds.
    let order = if new.start <= current.end {
        [
            (libc::PR_SET_MM_ARG_START, new.start),
            (libc::PR_SET_MM_ARG_END, new.end),
        ]
    } else {
        [
            (libc::PR_SET_MM_ARG_END, new.end),
            (libc::PR_SET_MM_ARG_START, new.start),
        ]
    };
    for (what, addr) in order {
        // SAFETY: prctl with PR_SET_MM takes two unsigned longs and an unused zero; it
        // changes only what /proc shows as the argument area, no memory of ours.
        let rc = unsafe {
            libc::prctl(
                libc::PR_SET_MM,
                what as libc::c_ulong,
                addr as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if rc != 0 {
            return None;
        }
    }
    Some(ArgvTitle::Relocated { kept })
}

fn relocation_page() -> Option<usize> {
    let page = RELOCATION_PAGE.load(Ordering::Acquire);
    if page != 0 {
        return Some(page);
    }
    let len = std::num::NonZeroUsize::new(4096)?;
    // SAFETY: a fresh private anonymous mapping at an address the kernel chooses; it
    // overlaps nothing. It is never unmapped, so the address stays valid for the life of
    // the process.
    let ptr = unsafe {
        nix::sys::mman::mmap_anonymous(
            None,
            len,
            nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
            nix::sys::mman::MapFlags::MAP_PRIVATE,
        )
    }
    .ok()?;
    let addr = ptr.as_ptr() as usize;
    RELOCATION_PAGE.store(addr, Ordering::Release);
    Some(addr)
}

fn read_arg_area() -> io::Result<ArgArea> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let start = stat_field(&stat, 48)?;
    let end = stat_field(&stat, 49)?;
    let (start, end) = (to_usize(start)?, to_usize(end)?);
    if start == 0 || end <= start {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "argument area not shown",
        ));
    }
    Ok(ArgArea { start, end })
}

fn to_usize(v: u64) -> io::Result<usize> {
    usize::try_from(v)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "address out of range"))
}

/// Whether `[start, end)` lies inside one mapping of `/proc/self/maps` that is readable and
/// writable.
fn area_is_writable(area: ArgArea) -> bool {
    std::fs::read_to_string("/proc/self/maps").is_ok_and(|maps| maps_cover_writable(&maps, area))
}

fn maps_cover_writable(maps: &str, area: ArgArea) -> bool {
    maps.lines().any(|line| {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            return false;
        };
        let Some((lo, hi)) = range.split_once('-') else {
            return false;
        };
        let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        else {
            return false;
        };
        lo <= area.start && area.end <= hi && perms.starts_with("rw")
    })
}

/// Field `n` (numbered from 1 as in `proc(5)`) of a `/proc/<pid>/stat` line, for the numeric
/// fields after the command name (n >= 3). The command name may hold spaces and parentheses,
/// so fields are counted from the last `)`.
pub(crate) fn stat_field(stat: &str, n: usize) -> io::Result<u64> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no field {n} in /proc stat"),
        )
    };
    if n < 3 {
        return Err(bad());
    }
    let after = stat.rfind(')').map(|i| &stat[i + 1..]).ok_or_else(bad)?;
    let field = after.split_whitespace().nth(n - 3).ok_or_else(bad)?;
    if n == 3 {
        // The state is a letter; report it as its byte.
        return field.bytes().next().map(u64::from).ok_or_else(bad);
    }
    field.parse::<u64>().map_err(|_| bad())
}

/// How many threads the calling process has (entries of `/proc/self/task`).
pub fn thread_count() -> Result<usize, IdentityError> {
    std::fs::read_dir("/proc/self/task")
        .map(Iterator::count)
        .map_err(IdentityError::Proc)
}

/// The start time of the calling process since boot, in clock ticks (field 22 of
/// `/proc/self/stat`). With the pid it names a process across pid reuse.
pub(crate) fn process_start_time() -> io::Result<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    stat_field(&stat, 22)
}

// ---------------------------------------------------------------------------------------
// Users and groups
// ---------------------------------------------------------------------------------------

/// A user, by name or numeric id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserSpec {
    /// A user name, looked up in the user database.
    Name(String),
    /// A numeric uid; looked up too, but usable without an entry when the group and the
    /// supplementary groups are given explicitly.
    Id(u32),
}

impl From<&str> for UserSpec {
    fn from(name: &str) -> Self {
        Self::Name(name.to_owned())
    }
}

impl From<String> for UserSpec {
    fn from(name: String) -> Self {
        Self::Name(name)
    }
}

impl From<u32> for UserSpec {
    fn from(uid: u32) -> Self {
        Self::Id(uid)
    }
}

/// The primary group to switch to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GroupSpec {
    /// The user's primary group from the user database.
    #[default]
    OfUser,
    /// A group name, looked up in the group database.
    Name(String),
    /// A numeric gid.
    Id(u32),
}

impl From<&str> for GroupSpec {
    fn from(name: &str) -> Self {
        Self::Name(name.to_owned())
    }
}

impl From<String> for GroupSpec {
    fn from(name: String) -> Self {
        Self::Name(name)
    }
}

impl From<u32> for GroupSpec {
    fn from(gid: u32) -> Self {
        Self::Id(gid)
    }
}

/// The supplementary groups to set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SupplementaryGroups {
    /// The user's groups from the group database (`getgrouplist`, which includes the primary
    /// group).
    #[default]
    OfUser,
    /// Exactly these gids (empty: none at all).
    Only(Vec<u32>),
}

/// A request to drop privileges: user, group and supplementary groups.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivilegeDrop {
    /// The user to become.
    pub user: UserSpec,
    /// The primary group to switch to.
    pub group: GroupSpec,
    /// The supplementary groups to set.
    pub supplementary: SupplementaryGroups,
}

impl PrivilegeDrop {
    /// A drop to `user`, with the user's primary group and supplementary groups.
    pub fn new(user: impl Into<UserSpec>) -> Self {
        Self {
            user: user.into(),
            group: GroupSpec::OfUser,
            supplementary: SupplementaryGroups::OfUser,
        }
    }

    /// The primary group to switch to instead of the user's.
    #[must_use]
    pub fn group(mut self, group: impl Into<GroupSpec>) -> Self {
        self.group = group.into();
        self
    }

    /// The supplementary groups to set instead of the user's.
    #[must_use]
    pub fn supplementary(mut self, groups: SupplementaryGroups) -> Self {
        self.supplementary = groups;
        self
    }

    /// Looks the user and groups up and returns the numeric credentials to apply. Reads the
    /// user and group databases: do it before `fork` in a threaded program.
    pub fn resolve(&self) -> Result<Credentials, IdentityError> {
        let user = match &self.user {
            UserSpec::Name(name) => Some(
                User::from_name(name)
                    .map_err(IdentityError::Lookup)?
                    .ok_or_else(|| IdentityError::UnknownUser(self.user.clone()))?,
            ),
            UserSpec::Id(uid) => {
                User::from_uid(Uid::from_raw(*uid)).map_err(IdentityError::Lookup)?
            }
        };
        let uid = match (&user, &self.user) {
            (Some(u), _) => u.uid.as_raw(),
            (None, UserSpec::Id(uid)) => *uid,
            (None, UserSpec::Name(_)) => return Err(IdentityError::UnknownUser(self.user.clone())),
        };
        let unknown_user = || IdentityError::UnknownUser(UserSpec::Id(uid));
        let gid = match &self.group {
            GroupSpec::OfUser => user.as_ref().ok_or_else(unknown_user)?.gid.as_raw(),
            GroupSpec::Id(gid) => *gid,
            GroupSpec::Name(name) => Group::from_name(name)
                .map_err(IdentityError::Lookup)?
                .ok_or_else(|| IdentityError::UnknownGroup(name.clone()))?
                .gid
                .as_raw(),
        };
        let mut groups = match &self.supplementary {
            SupplementaryGroups::Only(gids) => gids.clone(),
            SupplementaryGroups::OfUser => {
                let u = user.as_ref().ok_or_else(unknown_user)?;
                let name = CString::new(u.name.as_str())
                    .map_err(|_| IdentityError::InvalidName(u.name.clone()))?;
                nix::unistd::getgrouplist(&name, Gid::from_raw(gid))
                    .map_err(IdentityError::Lookup)?
                    .into_iter()
                    .map(Gid::as_raw)
                    .collect()
            }
        };
        groups.sort_unstable();
        groups.dedup();
        Ok(Credentials { uid, gid, groups })
    }
}

/// Numeric credentials, resolved and ready to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

impl Credentials {
    /// Credentials from numbers, without looking anything up.
    pub fn new(uid: u32, gid: u32, mut groups: Vec<u32>) -> Self {
        groups.sort_unstable();
        groups.dedup();
        Self { uid, gid, groups }
    }

    /// The user id.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The primary group id.
    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// The supplementary group ids, sorted, without duplicates.
    pub fn groups(&self) -> &[u32] {
        &self.groups
    }

    /// Switches the calling process to these credentials: `setgroups`, `setgid`, `setuid`,
    /// then verifies them (see the [module documentation](self)).
    ///
    /// Makes system calls only and allocates nothing (unless the list of supplementary
    /// groups exceeds 128 entries), so it may run in a child between `fork` and `exec`. On
    /// error the process is in an unknown state between identities: **`_exit`, do not go
    /// on.**
    pub fn apply(&self) -> Result<(), IdentityError> {
        let was_root = Uid::effective().is_root();
        let call =
            |call: CredentialCall| move |errno| IdentityError::CredentialCall { call, errno };
        // SAFETY: `groups` is a live slice of u32, which is gid_t on Linux; setgroups reads
        // exactly `len` of them.
        let rc = unsafe { libc::setgroups(self.groups.len(), self.groups.as_ptr()) };
        Errno::result(rc).map_err(call(CredentialCall::Setgroups))?;
        nix::unistd::setgid(Gid::from_raw(self.gid)).map_err(call(CredentialCall::Setgid))?;
        nix::unistd::setuid(Uid::from_raw(self.uid)).map_err(call(CredentialCall::Setuid))?;
        self.verify(was_root)
    }

    fn verify(&self, was_root: bool) -> Result<(), IdentityError> {
        let query = |errno| IdentityError::CredentialCall {
            call: CredentialCall::Query,
            errno,
        };
        let r = nix::unistd::getresuid().map_err(query)?;
        for found in [r.real, r.effective, r.saved] {
            if found.as_raw() != self.uid {
                return Err(IdentityError::Verification(CredentialMismatch::Uid {
                    expected: self.uid,
                    found: found.as_raw(),
                }));
            }
        }
        let r = nix::unistd::getresgid().map_err(query)?;
        for found in [r.real, r.effective, r.saved] {
            if found.as_raw() != self.gid {
                return Err(IdentityError::Verification(CredentialMismatch::Gid {
                    expected: self.gid,
                    found: found.as_raw(),
                }));
            }
        }
        if !self.groups_match().map_err(query)? {
            return Err(IdentityError::Verification(CredentialMismatch::Groups));
        }
        if was_root && self.uid != 0 {
            // Both must fail now; success means the drop is not permanent (and we are
            // privileged again, which the caller must treat as fatal).
            if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
                return Err(IdentityError::PrivilegesRegainable);
            }
            if self.gid != 0 && nix::unistd::setgid(Gid::from_raw(0)).is_ok() {
                return Err(IdentityError::PrivilegesRegainable);
            }
        }
        Ok(())
    }

    /// Whether the supplementary groups are exactly `self.groups` (sorted, deduplicated).
    fn groups_match(&self) -> Result<bool, Errno> {
        // SAFETY: with a zero size, getgroups only returns the count and writes nothing.
        let n = Errno::result(unsafe { libc::getgroups(0, std::ptr::null_mut()) })?;
        let n = usize::try_from(n).map_err(|_| Errno::EINVAL)?;
        if n != self.groups.len() {
            return Ok(false);
        }
        let mut on_stack = [0 as libc::gid_t; 128];
        let mut on_heap = Vec::new();
        let buf: &mut [libc::gid_t] = if n <= on_stack.len() {
            &mut on_stack[..n]
        } else {
            on_heap.resize(n, 0);
            &mut on_heap
        };
        let size = libc::c_int::try_from(buf.len()).map_err(|_| Errno::EINVAL)?;
        // SAFETY: `buf` holds `size` writable gid_t; getgroups writes at most that many.
        let got = Errno::result(unsafe { libc::getgroups(size, buf.as_mut_ptr()) })?;
        if usize::try_from(got).ok() != Some(n) {
            return Ok(false);
        }
        buf.sort_unstable();
        Ok(*buf == *self.groups)
    }
}

/// Drops the calling process to `user` and `group` (by name or id; [`GroupSpec::OfUser`] for
/// the user's own), with the user's supplementary groups, and verifies the result.
///
/// [`PrivilegeDrop`] gives control over the supplementary groups. On error **do not go on**:
/// the process may be half-way; in a child before `exec`, `_exit`.
pub fn drop_privileges(
    user: impl Into<UserSpec>,
    group: impl Into<GroupSpec>,
) -> Result<Credentials, IdentityError> {
    let creds = PrivilegeDrop::new(user).group(group).resolve()?;
    creds.apply()?;
    Ok(creds)
}

// ---------------------------------------------------------------------------------------
// Priority and CPUs
// ---------------------------------------------------------------------------------------

/// Checks that `nice` is a valid nice value.
pub fn check_nice(nice: i32) -> Result<(), IdentityError> {
    if (NICE_MIN..=NICE_MAX).contains(&nice) {
        Ok(())
    } else {
        Err(IdentityError::NiceOutOfRange(nice))
    }
}

/// Sets the nice value of the calling thread (the whole process when it has one thread;
/// threads started later inherit it). `-20..=19`; lowering it needs `CAP_SYS_NICE` or
/// `RLIMIT_NICE`.
pub fn set_nice(nice: i32) -> Result<(), IdentityError> {
    check_nice(nice)?;
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS as _, 0, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(IdentityError::Priority(Errno::last()))
    }
}

/// The nice value of the calling thread.
pub fn nice() -> Result<i32, IdentityError> {
    // getpriority may legitimately return -1; only errno tells an error apart.
    Errno::clear();
    // SAFETY: getpriority takes plain integers and touches no memory of ours.
    let n = unsafe { libc::getpriority(libc::PRIO_PROCESS as _, 0) };
    if n == -1 && Errno::last_raw() != 0 {
        return Err(IdentityError::Priority(Errno::last()));
    }
    Ok(n)
}

/// How many CPUs this machine has configured (indices `0..n`).
pub fn cpu_count() -> usize {
    // SAFETY: sysconf takes an integer and touches no memory of ours.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    usize::try_from(n).ok().filter(|n| *n > 0).unwrap_or(1)
}

/// Checks a CPU list for [`pin_to_cpus`]: non-empty, every index below `n_cpus` and below
/// what a `cpu_set_t` holds.
pub fn check_cpus(cpus: &[usize], n_cpus: usize) -> Result<(), IdentityError> {
    if cpus.is_empty() {
        return Err(IdentityError::EmptyCpuSet);
    }
    let limit = n_cpus.min(CpuSet::count());
    match cpus.iter().find(|c| **c >= limit) {
        Some(cpu) => Err(IdentityError::CpuOutOfRange {
            cpu: *cpu,
            n_cpus: limit,
        }),
        None => Ok(()),
    }
}

/// Restricts the calling thread (the process when it has one thread; later threads inherit
/// it) to these CPUs. Errors on an empty list or an index the machine does not have.
pub fn pin_to_cpus(cpus: &[usize]) -> Result<(), IdentityError> {
    check_cpus(cpus, cpu_count())?;
    let mut set = CpuSet::new();
    for cpu in cpus {
        set.set(*cpu).map_err(IdentityError::Affinity)?;
    }
    nix::sched::sched_setaffinity(Pid::from_raw(0), &set).map_err(IdentityError::Affinity)
}

/// The CPUs the calling thread may run on, ascending.
pub fn cpu_affinity() -> Result<Vec<usize>, IdentityError> {
    let set = nix::sched::sched_getaffinity(Pid::from_raw(0)).map_err(IdentityError::Affinity)?;
    Ok((0..CpuSet::count())
        .filter(|c| set.is_set(*c).unwrap_or(false))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_range_is_checked() {
        assert!(check_nice(-20).is_ok());
        assert!(check_nice(0).is_ok());
        assert!(check_nice(19).is_ok());
        assert!(matches!(
            check_nice(20),
            Err(IdentityError::NiceOutOfRange(20))
        ));
        assert!(matches!(
            check_nice(-21),
            Err(IdentityError::NiceOutOfRange(-21))
        ));
        assert!(matches!(
            check_nice(42),
            Err(IdentityError::NiceOutOfRange(42))
        ));
        assert!(matches!(
            set_nice(42),
            Err(IdentityError::NiceOutOfRange(42))
        ));
    }

    #[test]
    fn cpu_lists_are_checked() {
        assert!(matches!(
            check_cpus(&[], 4),
            Err(IdentityError::EmptyCpuSet)
        ));
        assert!(check_cpus(&[0, 3], 4).is_ok());
        assert!(matches!(
            check_cpus(&[0, 4], 4),
            Err(IdentityError::CpuOutOfRange { cpu: 4, n_cpus: 4 })
        ));
        assert!(matches!(
            check_cpus(&[5000], 8192),
            Err(IdentityError::CpuOutOfRange { cpu: 5000, .. })
        ));
        assert!(matches!(pin_to_cpus(&[]), Err(IdentityError::EmptyCpuSet)));
    }

    #[test]
    fn stat_fields_are_counted_after_the_command() {
        let line = "42 (a ) b (c)) S 1 42 42 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 777 rest";
        assert_eq!(stat_field(line, 4).ok(), Some(1));
        assert_eq!(stat_field(line, 3).ok(), Some(u64::from(b'S')));
        assert_eq!(stat_field(line, 22).ok(), Some(777));
        assert!(stat_field(line, 2).is_err());
        assert!(stat_field(line, 60).is_err());
        let own = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        assert_eq!(stat_field(&own, 4).ok().map(|_| ()), Some(()));
    }

    #[test]
    fn titles_are_cut_at_character_boundaries() {
        assert_eq!(
            cut_at_char_boundary("forkbus-test-title", COMM_MAX),
            "forkbus-test-ti"
        );
        assert_eq!(cut_at_char_boundary("short", COMM_MAX), "short");
        // 'é' is two bytes; a cut inside it backs off.
        assert_eq!(
            cut_at_char_boundary("aaaaaaaaaaaaaaé", COMM_MAX),
            "aaaaaaaaaaaaaa"
        );
        assert_eq!(cut_at_char_boundary_bytes("abé".as_bytes(), 3), 2);
        assert_eq!(cut_at_char_boundary_bytes(b"abc", 5), 3);
    }

    #[test]
    fn maps_must_cover_the_whole_area_writably() {
        let maps = "1000-2000 r--p 0 0:0 0 x\n7000-9000 rw-p 0 0:0 0 [stack]\n";
        assert!(maps_cover_writable(
            maps,
            ArgArea {
                start: 0x7100,
                end: 0x7200
            }
        ));
        assert!(!maps_cover_writable(
            maps,
            ArgArea {
                start: 0x1100,
                end: 0x1200
            }
        ));
        assert!(!maps_cover_writable(
            maps,
            ArgArea {
                start: 0x8f00,
                end: 0x9100
            }
        ));
    }

    #[test]
    fn invalid_titles_are_refused() {
        assert!(matches!(
            set_process_title(""),
            Err(IdentityError::InvalidTitle)
        ));
        assert!(matches!(
            set_process_title("a\0b"),
            Err(IdentityError::InvalidTitle)
        ));
    }

    #[test]
    fn explicit_credentials_need_no_lookup() {
        let c = PrivilegeDrop::new(4_000_000_u32)
            .group(4_000_000_u32)
            .supplementary(SupplementaryGroups::Only(vec![7, 3, 7]))
            .resolve();
        assert_eq!(
            c.ok(),
            Some(Credentials::new(4_000_000, 4_000_000, vec![3, 7]))
        );
        let missing = PrivilegeDrop::new("forkbus-no-such-user").resolve();
        assert!(matches!(missing, Err(IdentityError::UnknownUser(_))));
    }
}
