//! Shared memory for a process tree: a fixed-size region created before `fork` and inherited
//! by the whole subtree, a robust process-shared lock inside it, and a typed map on top.
//!
//! ```text
//!  SharedRegion: one MAP_SHARED | MAP_ANONYMOUS mapping, zero-filled, size fixed at creation
//!  ┌───────────────────────────── RegionHeader (repr C) ─────────────────────────────┐
//!  │ magic │ creator_pid │ state (LIVE/REMOVED) │ creator_start │ data_len │ recoveries │
//!  │ mutex: pthread_mutex_t  (PROCESS_SHARED + ROBUST + ERRORCHECK)                   │
//!  ├──────────────── data: data_len bytes, at a 64-byte aligned offset ───────────────┤
//!  │ raw SharedRegion: the caller's bytes (RegionGuard::data / data_mut)              │
//!  │ SharedMap:                                                                       │
//!  │  ┌ MapHeader (64 B): magic capacity key_max value_max len journal_slot           │
//!  │  │                   journal_len rollbacks                                       │
//!  │  ├ journal: one slot-sized copy of the slot being changed                        │
//!  │  ├ slot 0 │ slot 1 │ … │ slot capacity-1   (open addressing, linear probing)     │
//!  │  └ slot: state u32 │ key_len u32 │ value_len u32 │ pad │ hash u64 │              │
//!  │          key [key_max] │ value [value_max] │ pad to 8                            │
//!  └──────────────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! # Invariants
//!
//! - The region is mapped by [`SharedRegion::new`] and is visible to every process forked
//!   from the creator afterwards (the handle is copied by `fork`; there is no way to attach
//!   to it from outside the tree, and it does not survive `exec`). Its size never changes.
//! - The header is written once, before any other process can see it; afterwards only
//!   `state` and `recoveries` (atomics) and the mutex change.
//! - The data bytes are read and written only while holding the mutex, through a
//!   [`RegionGuard`] (or the map's [`MapGuard`]), which unlocks when dropped.
//! - The mutex is robust: when its holder dies holding it, the next `lock` is told
//!   (`EOWNERDEAD`), makes it consistent (`pthread_mutex_consistent`) and reports
//!   [`RegionGuard::recovered`]. It is error-checking: taking it twice in one thread is
//!   [`ShmError::WouldDeadlock`], not a deadlock.
//!
//! # What "remove" means
//!
//! An anonymous shared mapping has no name and cannot be deleted from other processes'
//! address spaces. [`SharedRegion::destroy`] (creator only, by pid and process start time,
//! so a reused pid is not the creator) marks the region removed under the lock and unmaps
//! the creator's view. From then on every operation in every process fails with
//! [`ShmError::Removed`]; each other process's view is unmapped when its handle drops or the
//! process exits, and the kernel frees the memory when the last view goes. Dropping a handle
//! (in the creator or anywhere else) only unmaps that process's view and removes nothing.
//! The mutex is never destroyed (another process may still be about to take it).
//!
//! # A holder that dies mid-update (the map)
//!
//! Every map operation changes at most one slot and the entry count, and journals it first:
//!
//! 1. copy the slot (its header, and its key and value bytes if it is full) into the
//!    journal, and the count into `journal_len`;
//! 2. store the slot's index into `journal_slot` (an atomic store: the commit point);
//! 3. change the slot and the count;
//! 4. store `NO_JOURNAL` into `journal_slot` (the operation is done).
//!
//! Fences keep the compiler from moving the stores of one step past the next. Whoever takes
//! the lock next (after a holder died, or at any lock) finds `journal_slot != NO_JOURNAL` and
//! copies the journal back: the operation that was in progress is undone, whole. So after a
//! holder's death the map is exactly as it was before that holder's last operation, or after
//! it; never in between. Operations a holder completed inside one [`MapGuard`] before dying
//! stay done (a guard is not a transaction). [`MapGuard::recovered`] and
//! [`MapGuard::rolled_back`] tell the taker what happened; [`SharedMap::rollbacks`] and
//! [`SharedRegion::recoveries`] count it for everyone.
//!
//! Keys are compared by their CBOR encoding (ciborium), so a key type must encode each value
//! one way (no hash maps inside keys). Reads never create entries. A key or value whose
//! encoding is larger than its slot, or a new key in a full map, is an error and changes
//! nothing.

use std::borrow::Borrow;
use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::num::NonZeroUsize;
use std::ptr::{self, NonNull};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::{fmt, io, mem};

use nix::errno::Errno;
use nix::libc;
use nix::sys::mman::{self, MapFlags, ProtFlags};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{DecodeError, EncodeError};

const REGION_MAGIC: u64 = u64::from_le_bytes(*b"fbREGION");
const MAP_MAGIC: u64 = u64::from_le_bytes(*b"fbSHRMAP");
const STATE_LIVE: u32 = 1;
const STATE_REMOVED: u32 = 2;
const DATA_ALIGN: usize = 64;

/// What went wrong with a shared region, its lock or a shared map.
#[non_exhaustive]
#[derive(Debug)]
pub enum ShmError {
    /// The region was destroyed by its creator; nothing more can be done with it.
    Removed,
    /// Only the process that created the region may destroy it.
    NotCreator {
        /// The creator's pid.
        creator_pid: i32,
    },
    /// This thread already holds the lock; taking it again would deadlock.
    WouldDeadlock,
    /// A holder died and the lock was unlocked without being made consistent; it can never
    /// be taken again (`ENOTRECOVERABLE`). Cannot happen through this module's API.
    Unrecoverable,
    /// A pthread call on the lock failed.
    Lock {
        /// The call.
        call: &'static str,
        /// Why.
        errno: Errno,
    },
    /// Mapping the region failed.
    Map(Errno),
    /// A size or capacity is zero or too large.
    InvalidConfig(&'static str),
    /// The key's encoding is larger than the map's key slots.
    KeyTooLarge {
        /// Its encoded length.
        len: usize,
        /// The slot size for keys.
        max: usize,
    },
    /// The value's encoding is larger than the map's value slots.
    ValueTooLarge {
        /// Its encoded length.
        len: usize,
        /// The slot size for values.
        max: usize,
    },
    /// The map holds `capacity` entries and the key is not one of them.
    MapFull {
        /// The map's capacity.
        capacity: usize,
    },
    /// Encoding a key or value failed (its `Serialize` did).
    Encode(EncodeError),
    /// Decoding a stored key or value failed (it is not the type asked for).
    Decode(DecodeError),
    /// A slot or header holds values this module never writes.
    Corrupt(&'static str),
}

impl fmt::Display for ShmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Removed => f.write_str("the shared region was removed by its creator"),
            Self::NotCreator { creator_pid } => {
                write!(
                    f,
                    "only the creating process ({creator_pid}) may remove a shared region"
                )
            }
            Self::WouldDeadlock => f.write_str("this thread already holds the shared lock"),
            Self::Unrecoverable => f.write_str("the shared lock is unrecoverable"),
            Self::Lock { call, errno } => write!(f, "{call} failed: {errno}"),
            Self::Map(e) => write!(f, "mapping shared memory failed: {e}"),
            Self::InvalidConfig(what) => write!(f, "invalid shared memory configuration: {what}"),
            Self::KeyTooLarge { len, max } => {
                write!(
                    f,
                    "encoded key is {len} bytes; the map's key slots hold {max}"
                )
            }
            Self::ValueTooLarge { len, max } => {
                write!(
                    f,
                    "encoded value is {len} bytes; the map's value slots hold {max}"
                )
            }
            Self::MapFull { capacity } => write!(f, "the shared map is full ({capacity} entries)"),
            Self::Encode(e) => write!(f, "encoding for the shared map failed: {e}"),
            Self::Decode(e) => write!(f, "decoding from the shared map failed: {e}"),
            Self::Corrupt(what) => write!(f, "shared memory is corrupt: {what}"),
        }
    }
}

impl std::error::Error for ShmError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Lock { errno, .. } | Self::Map(errno) => Some(errno),
            Self::Encode(e) => Some(e),
            Self::Decode(e) => Some(e),
            _ => None,
        }
    }
}

impl From<ShmError> for io::Error {
    fn from(e: ShmError) -> Self {
        let kind = match &e {
            ShmError::Lock { errno, .. } | ShmError::Map(errno) => return Self::from(*errno),
            ShmError::Removed => io::ErrorKind::NotFound,
            ShmError::NotCreator { .. } => io::ErrorKind::PermissionDenied,
            ShmError::WouldDeadlock => io::ErrorKind::WouldBlock,
            ShmError::KeyTooLarge { .. }
            | ShmError::ValueTooLarge { .. }
            | ShmError::MapFull { .. } => io::ErrorKind::StorageFull,
            ShmError::InvalidConfig(_) => io::ErrorKind::InvalidInput,
            ShmError::Encode(encode) => encode.io_kind(),
            _ => io::ErrorKind::InvalidData,
        };
        Self::new(kind, e)
    }
}

// ---------------------------------------------------------------------------------------
// The region and its lock
// ---------------------------------------------------------------------------------------

#[repr(C)]
struct RegionHeader {
    magic: u64,
    creator_pid: i32,
    state: AtomicU32,
    creator_start: u64,
    data_len: u64,
    recoveries: AtomicU64,
    /// Changed by pthread calls in any process; only ever reached through a raw pointer.
    mutex: UnsafeCell<libc::pthread_mutex_t>,
}

const fn data_offset() -> usize {
    size_of::<RegionHeader>().div_ceil(DATA_ALIGN) * DATA_ALIGN
}

/// A fixed-size block of memory shared by a process and every process it forks afterwards,
/// with a robust process-shared lock guarding it. See the [module documentation](self).
///
/// Create it before forking; each child holds a copy of the handle. Dropping a handle unmaps
/// that process's view; [`destroy`](Self::destroy) (creator only) removes it for all.
pub struct SharedRegion {
    /// The mapping; `None` once this handle destroyed the region.
    base: Option<NonNull<u8>>,
    map_len: usize,
    data_len: usize,
    creator_pid: i32,
}

// SAFETY: the handle is an address and sizes. The header's mutable fields are atomics or
// the pthread mutex (which is thread-safe and process-shared); the data is reached only
// through a guard holding the mutex, and guards are !Send (they hold a raw pointer) so the
// mutex is unlocked by the thread that locked it.
unsafe impl Send for SharedRegion {}
// SAFETY: as for Send: every access through `&SharedRegion` goes through atomics or takes
// the mutex.
unsafe impl Sync for SharedRegion {}

impl fmt::Debug for SharedRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedRegion")
            .field("data_len", &self.data_len)
            .field("creator_pid", &self.creator_pid)
            .field("mapped", &self.base.is_some())
            .finish()
    }
}

impl SharedRegion {
    /// Maps a zero-filled region with `data_len` bytes of data and initialises its lock.
    pub fn new(data_len: usize) -> Result<Self, ShmError> {
        if data_len == 0 {
            return Err(ShmError::InvalidConfig(
                "a shared region needs at least one data byte",
            ));
        }
        let map_len = data_offset()
            .checked_add(data_len)
            .ok_or(ShmError::InvalidConfig("shared region size overflows"))?;
        let len = NonZeroUsize::new(map_len).ok_or(ShmError::InvalidConfig("empty region"))?;
        // SAFETY: a fresh anonymous shared mapping at an address the kernel chooses: it
        // overlaps no memory of ours. It is unmapped only by Drop or destroy.
        let ptr = unsafe {
            mman::mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )
        }
        .map_err(ShmError::Map)?;
        let pid = nix::unistd::getpid().as_raw();
        // From here on Drop unmaps if initialisation fails.
        let region = Self {
            base: Some(ptr.cast()),
            map_len,
            data_len,
            creator_pid: pid,
        };
        let header = ptr.cast::<RegionHeader>().as_ptr();
        // SAFETY: the mapping is at least `data_offset()` bytes, page-aligned (so aligned for
        // the header), zero-filled, and not yet visible to any other process or thread, so
        // plain writes cannot race. The mutex is initialised in place, as pthread requires
        // for a process-shared mutex.
        unsafe {
            ptr::addr_of_mut!((*header).magic).write(REGION_MAGIC);
            ptr::addr_of_mut!((*header).creator_pid).write(pid);
            ptr::addr_of_mut!((*header).creator_start)
                .write(crate::identity::process_start_time().unwrap_or(0));
            ptr::addr_of_mut!((*header).data_len).write(data_len as u64);
            init_robust_mutex(UnsafeCell::raw_get(ptr::addr_of!((*header).mutex)))?;
            (*ptr::addr_of!((*header).state)).store(STATE_LIVE, Ordering::Release);
        }
        Ok(region)
    }

    /// How many data bytes the region holds.
    pub fn data_len(&self) -> usize {
        self.data_len
    }

    /// The pid of the process that created the region.
    pub fn creator_pid(&self) -> i32 {
        self.creator_pid
    }

    /// Whether the calling process created the region (same pid and same start time, so a
    /// process that reuses the creator's pid is not taken for it).
    pub fn is_creator(&self) -> bool {
        let Some(header) = self.header() else {
            return false;
        };
        // SAFETY: the header is mapped while `base` is Some, and `creator_start` was written
        // before the region was shared and never changes.
        let start = unsafe { ptr::addr_of!((*header).creator_start).read() };
        nix::unistd::getpid().as_raw() == self.creator_pid
            && (start == 0 || crate::identity::process_start_time().is_ok_and(|now| now == start))
    }

    /// Whether the region has been removed (by this handle, or by the creator anywhere).
    pub fn is_removed(&self) -> bool {
        self.state_atomic()
            .is_none_or(|s| s.load(Ordering::Acquire) == STATE_REMOVED)
    }

    /// How many times a taker of the lock found its holder dead.
    pub fn recoveries(&self) -> Result<u64, ShmError> {
        let header = self.header().ok_or(ShmError::Removed)?;
        // SAFETY: mapped while `base` is Some; `recoveries` is an atomic.
        Ok(unsafe { (*ptr::addr_of!((*header).recoveries)).load(Ordering::Acquire) })
    }

    /// Takes the lock, waiting for it. See [`RegionGuard::recovered`] for a holder that died.
    ///
    /// Errors: [`ShmError::Removed`] once the creator removed the region,
    /// [`ShmError::WouldDeadlock`] when this thread holds it already.
    pub fn lock(&self) -> Result<RegionGuard<'_>, ShmError> {
        let mutex = self.mutex().ok_or(ShmError::Removed)?;
        // SAFETY: `mutex` points to the mutex initialised by `new` in a mapping that stays
        // mapped while `self` is borrowed (unmapping needs `&mut self` or Drop).
        let rc = unsafe { libc::pthread_mutex_lock(mutex) };
        self.finish_lock(mutex, "pthread_mutex_lock", rc)?
            .ok_or(ShmError::Lock {
                call: "pthread_mutex_lock",
                errno: Errno::EBUSY,
            })
    }

    /// Takes the lock if it is free; `Ok(None)` when another holder has it.
    pub fn try_lock(&self) -> Result<Option<RegionGuard<'_>>, ShmError> {
        let mutex = self.mutex().ok_or(ShmError::Removed)?;
        // SAFETY: as in `lock`.
        let rc = unsafe { libc::pthread_mutex_trylock(mutex) };
        self.finish_lock(mutex, "pthread_mutex_trylock", rc)
    }

    /// Removes the region for every process (see the [module documentation](self)): marks it
    /// removed under the lock, then unmaps this view. Only the creator may; others get
    /// [`ShmError::NotCreator`] and keep their handle as it was. A second call is
    /// [`ShmError::Removed`].
    pub fn destroy(&mut self) -> Result<(), ShmError> {
        let base = self.base.ok_or(ShmError::Removed)?;
        if !self.is_creator() {
            return Err(ShmError::NotCreator {
                creator_pid: self.creator_pid,
            });
        }
        // Mark it under the lock so no holder sees it vanish mid-operation. Even if the lock
        // cannot be had, the mark is an atomic store and takes effect at every next lock.
        let guard = self.lock();
        if let Some(state) = self.state_atomic() {
            state.store(STATE_REMOVED, Ordering::Release);
        }
        drop(guard);
        self.base = None;
        // SAFETY: `base`/`map_len` are exactly what mmap returned; `&mut self` guarantees no
        // guard or other borrow of this handle is alive, and `base` is None from now on.
        unsafe { mman::munmap(base.cast(), self.map_len) }.map_err(ShmError::Map)
    }

    fn header(&self) -> Option<*mut RegionHeader> {
        self.base.map(|b| b.cast::<RegionHeader>().as_ptr())
    }

    fn state_atomic(&self) -> Option<&AtomicU32> {
        // SAFETY: the header is mapped while `base` is Some and the returned reference
        // borrows `self`, which must be borrowed mutably to unmap. `state` is an atomic.
        self.header()
            .map(|h| unsafe { &*ptr::addr_of!((*h).state) })
    }

    fn mutex(&self) -> Option<*mut libc::pthread_mutex_t> {
        // SAFETY: computing a field address inside the mapped header; nothing is read.
        self.header()
            .map(|h| unsafe { UnsafeCell::raw_get(ptr::addr_of!((*h).mutex)) })
    }

    fn data_ptr(&self) -> Option<*mut u8> {
        // SAFETY: `data_offset() + data_len == map_len`, so the offset stays in the mapping.
        self.base.map(|b| unsafe { b.as_ptr().add(data_offset()) })
    }

    fn finish_lock(
        &self,
        mutex: *mut libc::pthread_mutex_t,
        call: &'static str,
        rc: libc::c_int,
    ) -> Result<Option<RegionGuard<'_>>, ShmError> {
        let recovered = match rc {
            0 => false,
            libc::EOWNERDEAD => {
                // We hold it, but the previous holder died. Make it usable again before
                // anything else; if we die now, the next taker gets EOWNERDEAD again.
                // SAFETY: we hold the mutex (EOWNERDEAD means acquired).
                let rc = unsafe { libc::pthread_mutex_consistent(mutex) };
                if rc != 0 {
                    // SAFETY: we hold the mutex; unlocking an inconsistent one leaves it
                    // unrecoverable, which the next taker is told.
                    unsafe { libc::pthread_mutex_unlock(mutex) };
                    return Err(ShmError::Lock {
                        call: "pthread_mutex_consistent",
                        errno: Errno::from_raw(rc),
                    });
                }
                if let Some(h) = self.header() {
                    // SAFETY: mapped while `base` is Some; an atomic.
                    unsafe { (*ptr::addr_of!((*h).recoveries)).fetch_add(1, Ordering::AcqRel) };
                }
                true
            }
            libc::EBUSY => return Ok(None),
            libc::EDEADLK => return Err(ShmError::WouldDeadlock),
            libc::ENOTRECOVERABLE => return Err(ShmError::Unrecoverable),
            e => {
                return Err(ShmError::Lock {
                    call,
                    errno: Errno::from_raw(e),
                })
            }
        };
        let guard = RegionGuard {
            region: self,
            mutex,
            recovered,
            _not_send: PhantomData,
        };
        if self.is_removed() {
            drop(guard);
            return Err(ShmError::Removed);
        }
        Ok(Some(guard))
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        if let Some(base) = self.base.take() {
            // SAFETY: exactly the mapping mmap returned; `&mut self` means no guard is alive.
            // Only this process's view goes; the memory lives on in others'.
            let _ = unsafe { mman::munmap(base.cast(), self.map_len) };
        }
    }
}

/// Initialises a process-shared, robust, error-checking mutex in place.
///
/// # Safety
/// `mutex` must point to writable memory for a `pthread_mutex_t` that no thread or process
/// uses yet.
unsafe fn init_robust_mutex(mutex: *mut libc::pthread_mutex_t) -> Result<(), ShmError> {
    let mut attr = mem::MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
    let check = |call: &'static str, rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(ShmError::Lock {
                call,
                errno: Errno::from_raw(rc),
            })
        }
    };
    // SAFETY: `attr` is initialised by pthread_mutexattr_init before any other use and
    // destroyed exactly once; `mutex` is valid and unused per this function's contract.
    unsafe {
        check(
            "pthread_mutexattr_init",
            libc::pthread_mutexattr_init(attr.as_mut_ptr()),
        )?;
        let attr = attr.as_mut_ptr();
        let result = check(
            "pthread_mutexattr_setpshared",
            libc::pthread_mutexattr_setpshared(attr, libc::PTHREAD_PROCESS_SHARED),
        )
        .and_then(|()| {
            check(
                "pthread_mutexattr_setrobust",
                libc::pthread_mutexattr_setrobust(attr, libc::PTHREAD_MUTEX_ROBUST),
            )
        })
        .and_then(|()| {
            check(
                "pthread_mutexattr_settype",
                libc::pthread_mutexattr_settype(attr, libc::PTHREAD_MUTEX_ERRORCHECK),
            )
        })
        .and_then(|()| check("pthread_mutex_init", libc::pthread_mutex_init(mutex, attr)));
        libc::pthread_mutexattr_destroy(attr);
        result
    }
}

/// The lock of a [`SharedRegion`], held; unlocks when dropped. Gives access to the data.
///
/// Not `Send`: the thread that locked must unlock. A copy inherited through `fork` is not
/// the holder: dropping it in the child fails to unlock (the error is ignored) and the
/// parent still holds the lock.
#[must_use = "the lock is released when the guard is dropped"]
pub struct RegionGuard<'a> {
    region: &'a SharedRegion,
    mutex: *mut libc::pthread_mutex_t,
    recovered: bool,
    _not_send: PhantomData<*mut u8>,
}

impl fmt::Debug for RegionGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionGuard")
            .field("recovered", &self.recovered)
            .finish()
    }
}

impl RegionGuard<'_> {
    /// Whether the previous holder died holding the lock. The lock has been made usable
    /// again; the data may be half-way through whatever that holder was changing, and the
    /// caller must check or repair it. (A [`SharedMap`] does this itself.)
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    /// The region's data.
    pub fn data(&self) -> &[u8] {
        let (ptr, len) = self.raw_data();
        // SAFETY: the data area is mapped for `len` bytes while the region is borrowed, and
        // while this guard holds the mutex no process writes it (all writes go through a
        // guard). The slice borrows the guard, so it ends before the unlock.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }

    /// The region's data, to change. A holder may die at any instruction: keep a change
    /// detectable (a commit word written last, with a fence, as the map does) if others
    /// must make sense of a half-done one.
    pub fn data_mut(&mut self) -> &mut [u8] {
        let (ptr, len) = self.raw_data();
        // SAFETY: as in `data`, and `&mut self` makes this the only slice into the data in
        // this process while it lives.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }

    fn raw_data(&self) -> (*mut u8, usize) {
        // A guard exists only for a mapped region (`base` is Some while borrowed).
        match self.region.data_ptr() {
            Some(p) => (p, self.region.data_len),
            None => (NonNull::dangling().as_ptr(), 0),
        }
    }
}

impl Drop for RegionGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: the mutex is mapped while the region is borrowed. Unlock fails harmlessly
        // (EPERM) if this thread is not the owner, e.g. a guard copied by fork.
        let _ = unsafe { libc::pthread_mutex_unlock(self.mutex) };
    }
}

// ---------------------------------------------------------------------------------------
// The map
// ---------------------------------------------------------------------------------------

/// The sizes of a [`SharedMap`], fixed at creation.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapConfig {
    /// How many entries it can hold.
    pub capacity: usize,
    /// The most bytes a key's CBOR encoding may take.
    pub key_max: usize,
    /// The most bytes a value's CBOR encoding may take.
    pub value_max: usize,
}

impl MapConfig {
    /// A configuration with these sizes.
    pub fn new(capacity: usize, key_max: usize, value_max: usize) -> Self {
        Self {
            capacity,
            key_max,
            value_max,
        }
    }
}

#[repr(C)]
struct MapHeader {
    magic: AtomicU64,
    capacity: AtomicU32,
    key_max: AtomicU32,
    value_max: AtomicU32,
    len: AtomicU32,
    journal_slot: AtomicU32,
    journal_len: AtomicU32,
    rollbacks: AtomicU64,
}

const MAP_HEADER_SIZE: usize = 64;
const SLOT_HEADER: usize = 24;
const NO_JOURNAL: u32 = u32::MAX;

const SLOT_EMPTY: u32 = 0;
const SLOT_FULL: u32 = 1;
const SLOT_TOMBSTONE: u32 = 2;

/// Where everything is inside the map's data area. Pure arithmetic, checked at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MapLayout {
    capacity: usize,
    key_max: usize,
    value_max: usize,
    slot_size: usize,
}

impl MapLayout {
    fn new(config: MapConfig) -> Result<Self, ShmError> {
        let MapConfig {
            capacity,
            key_max,
            value_max,
        } = config;
        if capacity == 0 || key_max == 0 || value_max == 0 {
            return Err(ShmError::InvalidConfig(
                "capacity, key_max and value_max must be non-zero",
            ));
        }
        let limit = u32::MAX as usize - 1;
        if capacity > limit || key_max > limit || value_max > limit {
            return Err(ShmError::InvalidConfig(
                "capacity, key_max and value_max must fit in u32",
            ));
        }
        let slot_size = SLOT_HEADER
            .checked_add(key_max)
            .and_then(|n| n.checked_add(value_max))
            .and_then(|n| n.checked_next_multiple_of(8))
            .ok_or(ShmError::InvalidConfig("slot size overflows"))?;
        let layout = Self {
            capacity,
            key_max,
            value_max,
            slot_size,
        };
        layout
            .total_len()
            .ok_or(ShmError::InvalidConfig("map size overflows"))?;
        Ok(layout)
    }

    /// Bytes the map needs: header, journal, slots.
    fn total_len(&self) -> Option<usize> {
        self.capacity
            .checked_add(1)?
            .checked_mul(self.slot_size)?
            .checked_add(MAP_HEADER_SIZE)
    }

    fn journal_offset(&self) -> usize {
        MAP_HEADER_SIZE
    }

    fn slot_offset(&self, idx: usize) -> usize {
        debug_assert!(idx < self.capacity);
        MAP_HEADER_SIZE + self.slot_size * (idx + 1)
    }

    fn key_offset(&self) -> usize {
        SLOT_HEADER
    }

    fn value_offset(&self) -> usize {
        SLOT_HEADER + self.key_max
    }

    /// Where a probe for `hash` starts.
    fn home(&self, hash: u64) -> usize {
        (hash % self.capacity as u64) as usize
    }
}

/// FNV-1a over the encoded key: cheap, good enough for a table this module fills itself.
fn hash_key(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, ShmError> {
    let mut out = Vec::new();
    crate::message::encode_into(value, &mut out, usize::MAX).map_err(ShmError::Encode)?;
    Ok(out)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ShmError> {
    // Strings inside are at most as long as the encoding: a scratch buffer that size is
    // enough, and smaller than ciborium's default 4 KiB.
    let mut scratch = vec![0_u8; bytes.len().max(16)];
    ciborium::from_reader_with_buffer(bytes, &mut scratch).map_err(|e| {
        ShmError::Decode(DecodeError::from_ciborium(
            e,
            std::any::type_name::<T>(),
            bytes.len(),
        ))
    })
}

fn encode_key<Q: Serialize + ?Sized>(key: &Q, layout: &MapLayout) -> Result<Vec<u8>, ShmError> {
    let bytes = encode(key)?;
    if bytes.len() > layout.key_max {
        return Err(ShmError::KeyTooLarge {
            len: bytes.len(),
            max: layout.key_max,
        });
    }
    Ok(bytes)
}

fn encode_value<V: Serialize + ?Sized>(value: &V, layout: &MapLayout) -> Result<Vec<u8>, ShmError> {
    let bytes = encode(value)?;
    if bytes.len() > layout.value_max {
        return Err(ShmError::ValueTooLarge {
            len: bytes.len(),
            max: layout.value_max,
        });
    }
    Ok(bytes)
}

/// Marks a map's key and value types without owning any (covariant, Send and Sync).
type Types<K, V> = PhantomData<fn(K, V) -> (K, V)>;

/// A typed key-value map of fixed capacity in a [`SharedRegion`], shared by a process and
/// every process it forks afterwards. Each operation takes the region's robust lock; see the
/// [module documentation](self) for what happens when a holder dies.
///
/// Keys and values are stored CBOR-encoded in fixed-size slots ([`MapConfig`]). Reads never
/// create entries; oversize keys or values and a full map are errors that change nothing.
pub struct SharedMap<K, V> {
    region: SharedRegion,
    layout: MapLayout,
    _types: Types<K, V>,
}

impl<K, V> fmt::Debug for SharedMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMap")
            .field("capacity", &self.layout.capacity)
            .field("key_max", &self.layout.key_max)
            .field("value_max", &self.layout.value_max)
            .field("region", &self.region)
            .finish()
    }
}

impl<K, V> SharedMap<K, V>
where
    K: Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
{
    /// Creates an empty map in a new shared region sized for `config`.
    pub fn new(config: MapConfig) -> Result<Self, ShmError> {
        let layout = MapLayout::new(config)?;
        let total = layout
            .total_len()
            .ok_or(ShmError::InvalidConfig("map size overflows"))?;
        let region = SharedRegion::new(total)?;
        let map = Self {
            region,
            layout,
            _types: PhantomData,
        };
        let header = map.header_ptr()?;
        // SAFETY: the data area is mapped, 64-byte aligned and at least MAP_HEADER_SIZE
        // bytes, so the header fits and is aligned. Only atomics are touched. The region is
        // not shared yet. Slots are zero (SLOT_EMPTY) from the fresh mapping.
        unsafe {
            let h = &*header;
            h.capacity.store(layout.capacity as u32, Ordering::Relaxed);
            h.key_max.store(layout.key_max as u32, Ordering::Relaxed);
            h.value_max
                .store(layout.value_max as u32, Ordering::Relaxed);
            h.len.store(0, Ordering::Relaxed);
            h.journal_slot.store(NO_JOURNAL, Ordering::Relaxed);
            h.magic.store(MAP_MAGIC, Ordering::Release);
        }
        Ok(map)
    }

    /// How many entries the map can hold.
    pub fn capacity(&self) -> usize {
        self.layout.capacity
    }

    /// The most bytes a key's encoding may take.
    pub fn key_max(&self) -> usize {
        self.layout.key_max
    }

    /// The most bytes a value's encoding may take.
    pub fn value_max(&self) -> usize {
        self.layout.value_max
    }

    /// The region underneath (for [`SharedRegion::is_creator`], `recoveries`, …).
    pub fn region(&self) -> &SharedRegion {
        &self.region
    }

    /// Whether the calling process created the map.
    pub fn is_creator(&self) -> bool {
        self.region.is_creator()
    }

    /// Takes the lock for several operations in a row (e.g. read-modify-write). Each
    /// operation is still undone alone if the holder dies; see [`MapGuard`].
    pub fn lock(&self) -> Result<MapGuard<'_, K, V>, ShmError> {
        let guard = self.region.lock()?;
        MapGuard::new(guard, &self.layout)
    }

    /// The value for `key`, if present. Never creates an entry.
    pub fn get<Q>(&self, key: &Q) -> Result<Option<V>, ShmError>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.lock()?.get(key)
    }

    /// Whether `key` is present. Never creates an entry.
    pub fn contains_key<Q>(&self, key: &Q) -> Result<bool, ShmError>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.lock()?.contains_key(key)
    }

    /// Inserts or replaces; returns the previous value.
    pub fn insert<Q>(&self, key: &Q, value: &V) -> Result<Option<V>, ShmError>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.lock()?.insert(key, value)
    }

    /// Removes `key`; returns its value.
    pub fn remove<Q>(&self, key: &Q) -> Result<Option<V>, ShmError>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.lock()?.remove(key)
    }

    /// How many entries the map holds.
    pub fn len(&self) -> Result<usize, ShmError> {
        Ok(self.lock()?.len())
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> Result<bool, ShmError> {
        Ok(self.lock()?.is_empty())
    }

    /// A snapshot of every entry, in slot order, taken under the lock.
    pub fn entries(&self) -> Result<Vec<(K, V)>, ShmError> {
        self.lock()?.iter().collect()
    }

    /// How many interrupted operations have been undone (see the module documentation).
    pub fn rollbacks(&self) -> Result<u64, ShmError> {
        let header = self.header_ptr()?;
        // SAFETY: mapped while the region is borrowed; an atomic.
        Ok(unsafe { (*header).rollbacks.load(Ordering::Acquire) })
    }

    /// Removes the map for every process; creator only. See [`SharedRegion::destroy`].
    pub fn destroy(&mut self) -> Result<(), ShmError> {
        self.region.destroy()
    }

    fn header_ptr(&self) -> Result<*const MapHeader, ShmError> {
        self.region
            .data_ptr()
            .map(|p| p.cast::<MapHeader>().cast_const())
            .ok_or(ShmError::Removed)
    }
}

/// The map's lock, held: several operations in a row. Unlocks when dropped.
///
/// Each operation is journaled and undone alone if the holder dies during it; operations it
/// completed before dying stay done.
#[must_use = "the lock is released when the guard is dropped"]
pub struct MapGuard<'a, K, V> {
    guard: RegionGuard<'a>,
    layout: &'a MapLayout,
    data: *mut u8,
    rolled_back: bool,
    _types: Types<K, V>,
}

impl<K, V> fmt::Debug for MapGuard<'_, K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MapGuard")
            .field("recovered", &self.guard.recovered())
            .field("rolled_back", &self.rolled_back)
            .finish()
    }
}

/// What a probe for a key found.
enum Probe {
    /// The key is in this slot.
    Found(usize),
    /// The key is absent; it would go in this slot (`None`: no free slot).
    Absent(Option<usize>),
}

impl<'a, K, V> MapGuard<'a, K, V>
where
    K: Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
{
    fn new(guard: RegionGuard<'a>, layout: &'a MapLayout) -> Result<Self, ShmError> {
        let data = guard.raw_data().0;
        let mut this = Self {
            guard,
            layout,
            data,
            rolled_back: false,
            _types: PhantomData,
        };
        if this.header().magic.load(Ordering::Acquire) != MAP_MAGIC {
            return Err(ShmError::Corrupt("map header"));
        }
        this.rolled_back = this.roll_back_journal();
        Ok(this)
    }

    /// Whether the previous holder died holding the lock.
    pub fn recovered(&self) -> bool {
        self.guard.recovered()
    }

    /// Whether an operation the previous holder had in progress was undone when this guard
    /// took the lock.
    pub fn rolled_back(&self) -> bool {
        self.rolled_back
    }

    /// The value for `key`, if present. Never creates an entry.
    pub fn get<Q>(&self, key: &Q) -> Result<Option<V>, ShmError>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let key = encode_key(key, self.layout)?;
        match self.probe(&key, hash_key(&key))? {
            Probe::Found(idx) => self.read_value(idx).map(Some),
            Probe::Absent(_) => Ok(None),
        }
    }

    /// Whether `key` is present. Never creates an entry.
    pub fn contains_key<Q>(&self, key: &Q) -> Result<bool, ShmError>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let key = encode_key(key, self.layout)?;
        Ok(matches!(self.probe(&key, hash_key(&key))?, Probe::Found(_)))
    }

    /// Inserts or replaces; returns the previous value. Errors (key or value too large, map
    /// full) change nothing.
    pub fn insert<Q>(&mut self, key: &Q, value: &V) -> Result<Option<V>, ShmError>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let key = encode_key(key, self.layout)?;
        let value = encode_value(value, self.layout)?;
        let hash = hash_key(&key);
        match self.probe(&key, hash)? {
            Probe::Found(idx) => {
                let old = self.read_value(idx)?;
                let len = self.header().len.load(Ordering::Relaxed);
                self.journaled(idx, len, |this| this.write_value(idx, &value));
                Ok(Some(old))
            }
            Probe::Absent(Some(idx)) => {
                let len = self.header().len.load(Ordering::Relaxed);
                self.journaled(idx, len + 1, |this| {
                    this.write_key(idx, &key, hash);
                    this.write_value(idx, &value);
                    this.set_state(idx, SLOT_FULL);
                });
                Ok(None)
            }
            Probe::Absent(None) => Err(ShmError::MapFull {
                capacity: self.layout.capacity,
            }),
        }
    }

    /// Removes `key`; returns its value.
    pub fn remove<Q>(&mut self, key: &Q) -> Result<Option<V>, ShmError>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let key = encode_key(key, self.layout)?;
        let Probe::Found(idx) = self.probe(&key, hash_key(&key))? else {
            return Ok(None);
        };
        let old = self.read_value(idx)?;
        let len = self.header().len.load(Ordering::Relaxed).saturating_sub(1);
        // A probe passing this slot would stop at the next one anyway if it is empty, so the
        // slot can be emptied instead of tombstoned.
        let next = (idx + 1) % self.layout.capacity;
        let state = if self.state(next) == SLOT_EMPTY {
            SLOT_EMPTY
        } else {
            SLOT_TOMBSTONE
        };
        self.journaled(idx, len, |this| this.set_state(idx, state));
        if len == 0 {
            // No entry left: every tombstone can go. Any subset of these stores leaves a valid
            // table (no FULL slot to find), so this needs no journal.
            for i in 0..self.layout.capacity {
                if self.state(i) == SLOT_TOMBSTONE {
                    self.set_state(i, SLOT_EMPTY);
                }
            }
        }
        Ok(Some(old))
    }

    /// How many entries the map holds.
    pub fn len(&self) -> usize {
        self.header().len.load(Ordering::Relaxed) as usize
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entry, in slot order, decoded as it is reached; the guard stays borrowed.
    pub fn iter(&self) -> impl Iterator<Item = Result<(K, V), ShmError>> + '_ {
        (0..self.layout.capacity)
            .filter(|idx| self.state(*idx) == SLOT_FULL)
            .map(|idx| Ok((self.read_key(idx)?, self.read_value(idx)?)))
    }

    // --- raw slot access; every pointer below is inside the data area, which is mapped and
    // --- ours alone while the guard holds the mutex.

    fn header(&self) -> &MapHeader {
        // SAFETY: the data area starts with the MapHeader (64-byte aligned, all atomics),
        // mapped while the guard borrows the region.
        unsafe { &*self.data.cast::<MapHeader>() }
    }

    fn slot(&self, idx: usize) -> *mut u8 {
        // SAFETY: idx < capacity, so the slot lies inside total_len <= data_len.
        unsafe { self.data.add(self.layout.slot_offset(idx)) }
    }

    fn journal(&self) -> *mut u8 {
        // SAFETY: the journal lies inside the data area (total_len counts it).
        unsafe { self.data.add(self.layout.journal_offset()) }
    }

    fn read_u32(slot: *mut u8, offset: usize) -> u32 {
        // SAFETY: offset < SLOT_HEADER within a slot; slots are 8-aligned. Plain reads under
        // the mutex.
        unsafe { slot.add(offset).cast::<u32>().read() }
    }

    fn write_u32(slot: *mut u8, offset: usize, v: u32) {
        // SAFETY: as in read_u32; plain writes under the mutex.
        unsafe { slot.add(offset).cast::<u32>().write(v) }
    }

    fn state(&self, idx: usize) -> u32 {
        Self::read_u32(self.slot(idx), 0)
    }

    fn set_state(&mut self, idx: usize, state: u32) {
        Self::write_u32(self.slot(idx), 0, state);
    }

    fn slot_hash(&self, idx: usize) -> u64 {
        // SAFETY: the hash sits at offset 16 of an 8-aligned slot.
        unsafe { self.slot(idx).add(16).cast::<u64>().read() }
    }

    fn slot_bytes(
        &self,
        idx: usize,
        offset: usize,
        len_at: usize,
        max: usize,
    ) -> Result<&[u8], ShmError> {
        let slot = self.slot(idx);
        let len = Self::read_u32(slot, len_at) as usize;
        if len > max {
            return Err(ShmError::Corrupt("slot length beyond its maximum"));
        }
        // SAFETY: offset + len <= offset + max, inside the slot; the slice borrows the guard,
        // during which nobody writes the slot.
        Ok(unsafe { std::slice::from_raw_parts(slot.add(offset), len) })
    }

    fn key_bytes(&self, idx: usize) -> Result<&[u8], ShmError> {
        self.slot_bytes(idx, self.layout.key_offset(), 4, self.layout.key_max)
    }

    fn value_bytes(&self, idx: usize) -> Result<&[u8], ShmError> {
        self.slot_bytes(idx, self.layout.value_offset(), 8, self.layout.value_max)
    }

    fn read_key(&self, idx: usize) -> Result<K, ShmError> {
        decode(self.key_bytes(idx)?)
    }

    fn read_value(&self, idx: usize) -> Result<V, ShmError> {
        decode(self.value_bytes(idx)?)
    }

    fn write_key(&mut self, idx: usize, key: &[u8], hash: u64) {
        debug_assert!(key.len() <= self.layout.key_max);
        let slot = self.slot(idx);
        Self::write_u32(slot, 4, key.len() as u32);
        // SAFETY: key.len() <= key_max (checked by encode_key), so the copy stays in the
        // slot's key area; the hash at offset 16 is 8-aligned.
        unsafe {
            slot.add(16).cast::<u64>().write(hash);
            ptr::copy_nonoverlapping(key.as_ptr(), slot.add(self.layout.key_offset()), key.len());
        }
    }

    fn write_value(&mut self, idx: usize, value: &[u8]) {
        debug_assert!(value.len() <= self.layout.value_max);
        let slot = self.slot(idx);
        Self::write_u32(slot, 8, value.len() as u32);
        // SAFETY: value.len() <= value_max (checked by encode_value): stays in the value area.
        unsafe {
            ptr::copy_nonoverlapping(
                value.as_ptr(),
                slot.add(self.layout.value_offset()),
                value.len(),
            )
        };
    }

    /// Finds `key`: its slot, or where it would go (the first tombstone or empty slot on its
    /// probe path). Visits each slot at most once.
    fn probe(&self, key: &[u8], hash: u64) -> Result<Probe, ShmError> {
        let cap = self.layout.capacity;
        let home = self.layout.home(hash);
        let mut free = None;
        for step in 0..cap {
            let idx = (home + step) % cap;
            match self.state(idx) {
                SLOT_EMPTY => return Ok(Probe::Absent(free.or(Some(idx)))),
                SLOT_TOMBSTONE => {
                    free.get_or_insert(idx);
                }
                SLOT_FULL => {
                    if self.slot_hash(idx) == hash && self.key_bytes(idx)? == key {
                        return Ok(Probe::Found(idx));
                    }
                }
                _ => return Err(ShmError::Corrupt("slot state")),
            }
        }
        Ok(Probe::Absent(free))
    }

    /// Runs `change` on slot `idx` under the journal (see the module documentation), then
    /// sets the entry count to `new_len`.
    fn journaled(&mut self, idx: usize, new_len: u32, change: impl FnOnce(&mut Self)) {
        // 1. Copy the slot (the part that matters) and the count into the journal.
        self.copy_used(self.slot(idx), self.journal());
        let header = self.header();
        header
            .journal_len
            .store(header.len.load(Ordering::Relaxed), Ordering::Relaxed);
        fence(Ordering::SeqCst);
        // 2. Commit the journal.
        header.journal_slot.store(idx as u32, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        // 3. Change the slot and the count.
        change(self);
        self.header().len.store(new_len, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        // 4. Retire the journal.
        self.header()
            .journal_slot
            .store(NO_JOURNAL, Ordering::SeqCst);
    }

    /// Undoes an operation left half-done by a holder that died: copies the journal back.
    /// Idempotent, so a taker that dies here leaves it to the next.
    fn roll_back_journal(&mut self) -> bool {
        let idx = self.header().journal_slot.load(Ordering::SeqCst);
        if idx == NO_JOURNAL {
            return false;
        }
        let idx = idx as usize;
        if idx < self.layout.capacity {
            self.copy_used(self.journal(), self.slot(idx));
            let header = self.header();
            header.len.store(
                header.journal_len.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
            fence(Ordering::SeqCst);
        }
        let header = self.header();
        header.journal_slot.store(NO_JOURNAL, Ordering::SeqCst);
        header.rollbacks.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Copies what matters of a slot (or of the journal) to another: the header, and for a
    /// full slot its key and value bytes. Bytes past the lengths in the header are never
    /// read, so they need not be saved.
    fn copy_used(&self, from: *mut u8, to: *mut u8) {
        let key_len = (Self::read_u32(from, 4) as usize).min(self.layout.key_max);
        let value_len = (Self::read_u32(from, 8) as usize).min(self.layout.value_max);
        let (key_len, value_len) = if Self::read_u32(from, 0) == SLOT_FULL {
            (key_len, value_len)
        } else {
            (0, 0)
        };
        let value_at = self.layout.value_offset();
        // SAFETY: `from` and `to` are distinct slot-sized areas (a slot and the journal)
        // inside the data area; both ranges lie within a slot because the lengths are
        // clamped to their maxima.
        unsafe {
            ptr::copy_nonoverlapping(from, to, SLOT_HEADER + key_len);
            ptr::copy_nonoverlapping(from.add(value_at), to.add(value_at), value_len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_places_header_journal_and_slots() {
        let l = MapLayout::new(MapConfig::new(4, 10, 3)).unwrap_or_else(|e| panic!("{e}"));
        // 24 + 10 + 3 = 37, rounded to 40.
        assert_eq!(l.slot_size, 40);
        assert_eq!(l.journal_offset(), 64);
        assert_eq!(l.slot_offset(0), 104);
        assert_eq!(l.slot_offset(3), 64 + 40 * 4);
        assert_eq!(l.total_len(), Some(64 + 40 * 5));
        assert_eq!(l.value_offset(), 34);
        assert_eq!(data_offset() % DATA_ALIGN, 0);
        assert!(data_offset() >= size_of::<RegionHeader>());
        assert!(size_of::<MapHeader>() <= MAP_HEADER_SIZE);
    }

    #[test]
    fn layout_refuses_zero_and_overflow() {
        assert!(matches!(
            MapLayout::new(MapConfig::new(0, 8, 8)),
            Err(ShmError::InvalidConfig(_))
        ));
        assert!(matches!(
            MapLayout::new(MapConfig::new(8, 0, 8)),
            Err(ShmError::InvalidConfig(_))
        ));
        assert!(matches!(
            MapLayout::new(MapConfig::new(
                u32::MAX as usize - 1,
                u32::MAX as usize - 1,
                8
            )),
            Err(ShmError::InvalidConfig(_))
        ));
        assert!(matches!(
            MapLayout::new(MapConfig::new(usize::MAX, 8, 8)),
            Err(ShmError::InvalidConfig(_))
        ));
    }

    #[test]
    fn encoding_bounds_are_errors() {
        let l = MapLayout::new(MapConfig::new(4, 6, 3)).unwrap_or_else(|e| panic!("{e}"));
        // "abcde" encodes as 1 header byte + 5.
        assert_eq!(encode_key("abcde", &l).map(|b| b.len()).ok(), Some(6));
        assert!(matches!(
            encode_key("abcdef", &l),
            Err(ShmError::KeyTooLarge { len: 7, max: 6 })
        ));
        assert!(encode_value(&23_u32, &l).is_ok());
        assert!(matches!(
            encode_value(&70_000_u32, &l),
            Err(ShmError::ValueTooLarge { len: 5, max: 3 })
        ));
        assert_eq!(
            decode::<String>(&encode("héllo").unwrap_or_default())
                .ok()
                .as_deref(),
            Some("héllo")
        );
        assert!(matches!(decode::<u32>(&[0xff]), Err(ShmError::Decode(_))));
    }

    fn map(capacity: usize) -> SharedMap<String, u64> {
        SharedMap::new(MapConfig::new(capacity, 16, 9)).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn map_operations_in_one_process() -> Result<(), ShmError> {
        let m = map(4);
        assert_eq!(m.get("a")?, None);
        assert_eq!(m.len()?, 0);
        assert_eq!(m.insert("a", &1)?, None);
        assert_eq!(m.insert("b", &2)?, None);
        assert_eq!(m.insert("a", &3)?, Some(1));
        assert_eq!(m.get("a")?, Some(3));
        assert!(m.contains_key("b")?);
        assert!(!m.contains_key("zz")?);
        assert_eq!(m.len()?, 2);
        assert_eq!(m.remove("b")?, Some(2));
        assert_eq!(m.remove("b")?, None);
        assert_eq!(m.len()?, 1);
        let mut entries = m.entries()?;
        entries.sort();
        assert_eq!(entries, vec![("a".to_owned(), 3)]);
        Ok(())
    }

    #[test]
    fn full_map_refuses_new_keys_but_replaces_old_ones() -> Result<(), ShmError> {
        let m = map(3);
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            m.insert(*k, &(i as u64))?;
        }
        assert!(matches!(
            m.insert("d", &9),
            Err(ShmError::MapFull { capacity: 3 })
        ));
        assert_eq!(m.insert("b", &7)?, Some(1));
        assert_eq!(m.len()?, 3);
        // Remove one (leaving a tombstone or a hole), then a new key fits again.
        assert_eq!(m.remove("a")?, Some(0));
        assert_eq!(m.insert("d", &4)?, None);
        assert_eq!(m.get("c")?, Some(2));
        assert_eq!(m.get("d")?, Some(4));
        assert!(matches!(m.insert("e", &5), Err(ShmError::MapFull { .. })));
        // Absent keys are found absent even with no empty slot left to stop the probe.
        assert_eq!(m.get("zzz")?, None);
        assert_eq!(m.len()?, 3);
        for k in ["b", "c", "d"] {
            assert!(m.remove(k)?.is_some());
        }
        assert!(m.is_empty()?);
        {
            let g = m.lock()?;
            assert!(
                (0..3).all(|i| g.state(i) == SLOT_EMPTY),
                "tombstones cleared when empty"
            );
        }
        Ok(())
    }

    #[test]
    fn oversize_entries_change_nothing() -> Result<(), ShmError> {
        let m = map(4);
        m.insert("k", &1)?;
        assert!(matches!(
            m.insert("a-key-far-too-long-for-its-slot", &1),
            Err(ShmError::KeyTooLarge { .. })
        ));
        assert!(matches!(
            m.get("a-key-far-too-long-for-its-slot"),
            Err(ShmError::KeyTooLarge { .. })
        ));
        let big: SharedMap<u8, String> = SharedMap::new(MapConfig::new(2, 4, 8))?;
        assert!(matches!(
            big.insert(&1, &"x".repeat(8)),
            Err(ShmError::ValueTooLarge { len: 9, max: 8 })
        ));
        assert_eq!(big.len()?, 0);
        assert_eq!(m.entries()?, vec![("k".to_owned(), 1)]);
        Ok(())
    }

    #[test]
    fn a_half_done_operation_is_rolled_back() -> Result<(), ShmError> {
        let m: SharedMap<String, String> = SharedMap::new(MapConfig::new(4, 16, 32))?;
        m.insert("a", &"before".to_owned())?;
        {
            // Simulate a holder dying in step 3: journal committed, slot half-written.
            let mut g = m.lock()?;
            let key = encode_key("a", &m.layout)?;
            let Probe::Found(idx) = g.probe(&key, hash_key(&key))? else {
                panic!("a is present");
            };
            let before = g.value_bytes(idx)?.to_vec();
            g.copy_used(g.slot(idx), g.journal());
            g.header().journal_len.store(1, Ordering::SeqCst);
            g.header().journal_slot.store(idx as u32, Ordering::SeqCst);
            g.write_value(idx, b"\x66garbage-half-written");
            g.header().len.store(3, Ordering::SeqCst);
            assert_ne!(g.value_bytes(idx)?, before.as_slice());
        }
        let g = m.lock()?;
        assert!(g.rolled_back());
        assert!(!g.recovered());
        assert_eq!(g.len(), 1);
        assert_eq!(g.get("a")?, Some("before".to_owned()));
        drop(g);
        assert_eq!(m.rollbacks()?, 1);
        assert!(!m.lock()?.rolled_back());
        Ok(())
    }

    #[test]
    fn relocking_in_one_thread_is_an_error_not_a_deadlock() -> Result<(), ShmError> {
        let r = SharedRegion::new(8)?;
        let mut g = r.lock()?;
        assert!(matches!(r.lock(), Err(ShmError::WouldDeadlock)));
        g.data_mut()[0] = 7;
        drop(g);
        assert_eq!(r.lock()?.data()[0], 7);
        assert!(r.try_lock()?.is_some());
        Ok(())
    }

    #[test]
    fn the_creator_destroys_and_everything_after_errors() -> Result<(), ShmError> {
        let mut m = map(2);
        assert!(m.is_creator());
        m.insert("a", &1)?;
        m.destroy()?;
        assert!(matches!(m.get("a"), Err(ShmError::Removed)));
        assert!(matches!(m.insert("a", &1), Err(ShmError::Removed)));
        assert!(matches!(m.destroy(), Err(ShmError::Removed)));
        assert!(m.region().is_removed());
        Ok(())
    }
}
