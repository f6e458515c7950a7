//! The safe layer over libvirt's C API (feature `libvirt`): a connection, its domains, and the
//! operations the balancers and the ledger need. Each call is one libvirt API call (one round
//! trip to libvirtd unless said otherwise); errors carry libvirt's own message and code.
//!
//! libvirt prints every error to stderr by default; opening a connection replaces that
//! process-wide handler with a silent one, since every error is returned here.

use std::ffi::{c_char, c_int, c_uint, c_ulong, CStr, CString};
use std::mem::ManuallyDrop;
use std::path::Path;
use std::ptr::{self, NonNull};
use std::sync::Once;

use thiserror::Error;

use super::discover::{discover, DiscoverError, Expected, Found};
use super::ffi;
use super::lifecycle::{Seen, State};

/// A failed libvirt call.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{call}: {message}")]
pub struct LibvirtError {
    /// The API function.
    pub call: &'static str,
    /// libvirt's error code (`virErrorNumber`), 0 when libvirt set none.
    pub code: i32,
    /// libvirt's message.
    pub message: String,
}

impl LibvirtError {
    /// The thread's last libvirt error, attributed to `call`.
    fn last(call: &'static str) -> Self {
        // SAFETY: both read libvirt's thread-local last error; the message pointer, when not
        // null, is a NUL-terminated string valid until the next libvirt call on this thread,
        // and is copied at once.
        let (code, message) = unsafe {
            let code = ffi::virGetLastErrorCode();
            let msg = ffi::virGetLastErrorMessage();
            let message = if msg.is_null() {
                "unknown error".to_owned()
            } else {
                CStr::from_ptr(msg).to_string_lossy().into_owned()
            };
            ffi::virResetLastError();
            (code, message)
        };
        LibvirtError {
            call,
            code,
            message,
        }
    }

    /// Whether the domain does not exist (any more).
    pub fn is_no_domain(&self) -> bool {
        self.code == ffi::VIR_ERR_NO_DOMAIN
    }

    /// Whether the operation needs a running (or a stopped) domain and it is not.
    pub fn is_wrong_state(&self) -> bool {
        self.code == ffi::VIR_ERR_OPERATION_INVALID
    }
}

fn cstring(call: &'static str, text: &str) -> Result<CString, LibvirtError> {
    CString::new(text).map_err(|_| LibvirtError {
        call,
        code: 0,
        message: format!("{text:?} contains a NUL byte"),
    })
}

/// Takes ownership of a string libvirt allocated (freed with `free`).
///
/// # Safety
/// `ptr` is null or a NUL-terminated string from `malloc` that nothing else frees.
unsafe fn owned_string(ptr: *mut c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-null, NUL-terminated (the caller's contract); freed once, after the copy.
    unsafe {
        let s = CStr::from_ptr(ptr).to_string_lossy().into_owned();
        libc::free(ptr.cast());
        Some(s)
    }
}

unsafe extern "C" fn silent(_: *mut std::ffi::c_void, _: *mut ffi::virError) {}

/// Which definition an operation reads or changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The running domain only.
    Live,
    /// The persistent definition only (from the next start on).
    Config,
    /// Both.
    Both,
}

impl Scope {
    fn flags(self) -> c_uint {
        match self {
            Scope::Live => ffi::VIR_DOMAIN_AFFECT_LIVE,
            Scope::Config => ffi::VIR_DOMAIN_AFFECT_CONFIG,
            Scope::Both => ffi::VIR_DOMAIN_AFFECT_LIVE | ffi::VIR_DOMAIN_AFFECT_CONFIG,
        }
    }
}

/// A connection to libvirt (`qemu:///system`, `qemu+ssh://host/system`, …).
#[derive(Debug)]
pub struct Connection {
    ptr: NonNull<ffi::virConnect>,
    uri: String,
}

// SAFETY: libvirt connections are thread-safe (every public API may be called on one
// connection from any thread; libvirt locks internally, "Thread safety" in its docs).
unsafe impl Send for Connection {}
// SAFETY: as above; no Rust-side state is mutated through &self.
unsafe impl Sync for Connection {}

/// The default URI: the system instance of the QEMU driver.
pub const DEFAULT_URI: &str = "qemu:///system";

impl Connection {
    /// Opens a read-write connection to `uri`.
    pub fn open(uri: &str) -> Result<Self, LibvirtError> {
        ffi::load().map_err(|message| LibvirtError {
            call: "dlopen",
            code: 0,
            message,
        })?;
        static QUIET: Once = Once::new();
        // SAFETY: installs a handler that ignores its arguments; libvirt keeps the function
        // pointer, which is 'static.
        QUIET.call_once(|| unsafe { ffi::virSetErrorFunc(ptr::null_mut(), Some(silent)) });
        let c = cstring("virConnectOpen", uri)?;
        // SAFETY: c is a valid NUL-terminated string for the duration of the call.
        let ptr = unsafe { ffi::virConnectOpen(c.as_ptr()) };
        let ptr = NonNull::new(ptr).ok_or_else(|| LibvirtError::last("virConnectOpen"))?;
        Ok(Connection {
            ptr,
            uri: uri.to_owned(),
        })
    }

    /// The URI it was opened with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Whether libvirtd still answers (no round trip: the client's keep-alive state).
    pub fn is_alive(&self) -> bool {
        // SAFETY: a valid connection.
        unsafe { ffi::virConnectIsAlive(self.ptr.as_ptr()) == 1 }
    }

    /// The libvirt library version as (major, minor, micro).
    pub fn lib_version(&self) -> Result<(u32, u32, u32), LibvirtError> {
        let mut v: c_ulong = 0;
        // SAFETY: a valid connection and a valid out pointer.
        if unsafe { ffi::virConnectGetLibVersion(self.ptr.as_ptr(), &mut v) } < 0 {
            return Err(LibvirtError::last("virConnectGetLibVersion"));
        }
        let v = v as u64;
        Ok((
            (v / 1_000_000) as u32,
            (v / 1000 % 1000) as u32,
            (v % 1000) as u32,
        ))
    }

    /// Every domain, active or not (one round trip).
    pub fn domains(&self) -> Result<Vec<Domain>, LibvirtError> {
        let mut list: *mut ffi::virDomainPtr = ptr::null_mut();
        // SAFETY: a valid connection; libvirt allocates the array and stores it in `list`.
        let n = unsafe { ffi::virConnectListAllDomains(self.ptr.as_ptr(), &mut list, 0) };
        if n < 0 {
            return Err(LibvirtError::last("virConnectListAllDomains"));
        }
        let mut domains = Vec::with_capacity(n as usize);
        for i in 0..n as usize {
            // SAFETY: libvirt returned n valid domain references at `list`; each becomes owned
            // by one Domain.
            let d = unsafe { *list.add(i) };
            if let Some(ptr) = NonNull::new(d) {
                domains.push(Domain { ptr });
            }
        }
        // SAFETY: the array itself (not the domains, now owned) is freed once.
        unsafe { libc::free(list.cast()) };
        Ok(domains)
    }

    /// The domain named `name`.
    pub fn domain(&self, name: &str) -> Result<Domain, LibvirtError> {
        let c = cstring("virDomainLookupByName", name)?;
        // SAFETY: valid connection and string.
        let ptr = unsafe { ffi::virDomainLookupByName(self.ptr.as_ptr(), c.as_ptr()) };
        NonNull::new(ptr)
            .map(|ptr| Domain { ptr })
            .ok_or_else(|| LibvirtError::last("virDomainLookupByName"))
    }

    /// The domain with UUID `uuid`.
    pub fn domain_by_uuid(&self, uuid: &str) -> Result<Domain, LibvirtError> {
        let c = cstring("virDomainLookupByUUIDString", uuid)?;
        // SAFETY: valid connection and string.
        let ptr = unsafe { ffi::virDomainLookupByUUIDString(self.ptr.as_ptr(), c.as_ptr()) };
        NonNull::new(ptr)
            .map(|ptr| Domain { ptr })
            .ok_or_else(|| LibvirtError::last("virDomainLookupByUUIDString"))
    }

    /// Defines (or redefines) a persistent domain from its XML.
    pub fn define(&self, xml: &str) -> Result<Domain, LibvirtError> {
        let c = cstring("virDomainDefineXML", xml)?;
        // SAFETY: valid connection and string.
        let ptr = unsafe { ffi::virDomainDefineXML(self.ptr.as_ptr(), c.as_ptr()) };
        NonNull::new(ptr)
            .map(|ptr| Domain { ptr })
            .ok_or_else(|| LibvirtError::last("virDomainDefineXML"))
    }

    /// Restores a domain saved with [`Domain::save`] (`virsh restore`).
    pub fn restore(&self, path: &Path) -> Result<(), LibvirtError> {
        let c = cstring("virDomainRestore", &path.to_string_lossy())?;
        // SAFETY: valid connection and string.
        if unsafe { ffi::virDomainRestore(self.ptr.as_ptr(), c.as_ptr()) } < 0 {
            return Err(LibvirtError::last("virDomainRestore"));
        }
        Ok(())
    }

    /// Every domain's identity, state and vCPU count, for [`super::lifecycle::diff`]: one round
    /// trip for the whole connection (`virConnectGetAllDomainStats`, state and vCPU groups).
    pub fn poll(&self) -> Result<Vec<Seen>, LibvirtError> {
        self.all_stats(ffi::VIR_DOMAIN_STATS_STATE | ffi::VIR_DOMAIN_STATS_VCPU)
    }

    /// Every domain's identity and state, `vcpus` left 0 (not asked): one round trip for the
    /// whole connection (`virConnectGetAllDomainStats`, state group only: libvirtd answers from
    /// its own records, without asking any domain's QEMU). What `ls` shows.
    pub fn states(&self) -> Result<Vec<Seen>, LibvirtError> {
        self.all_stats(ffi::VIR_DOMAIN_STATS_STATE)
    }

    /// Every domain's identity with the stats `groups` (`VIR_DOMAIN_STATS_*`) read into
    /// [`Seen`]: one `virConnectGetAllDomainStats`.
    fn all_stats(&self, groups: c_uint) -> Result<Vec<Seen>, LibvirtError> {
        let mut records: *mut *mut ffi::virDomainStatsRecord = ptr::null_mut();
        // SAFETY: a valid connection; libvirt allocates a NULL-terminated record list.
        let n =
            unsafe { ffi::virConnectGetAllDomainStats(self.ptr.as_ptr(), groups, &mut records, 0) };
        if n < 0 {
            return Err(LibvirtError::last("virConnectGetAllDomainStats"));
        }
        let mut seen = Vec::with_capacity(n as usize);
        for i in 0..n as usize {
            // SAFETY: n valid record pointers; each record's params array has nparams
            // entries; the domain pointer is borrowed (owned by the list).
            let record = unsafe { &**records.add(i) };
            let params = typed_params(record.params, record.nparams);
            let int = |name: &str| params.iter().find(|p| p.0 == name).and_then(|p| p.1);
            // Borrowed from the list, which frees it: never dropped here.
            if let Some(d) = NonNull::new(record.dom).map(|ptr| ManuallyDrop::new(Domain { ptr })) {
                seen.push(Seen {
                    uuid: d.uuid(),
                    name: d.name(),
                    id: d.id(),
                    state: State::from_raw(int("state.state").unwrap_or(0) as i32),
                    reason: int("state.reason").unwrap_or(0) as i32,
                    vcpus: int("vcpu.current")
                        .and_then(|n| u32::try_from(n).ok())
                        .unwrap_or(0),
                });
            }
        }
        // SAFETY: frees the list and its records once (domains included).
        unsafe { ffi::virDomainStatsRecordListFree(records) };
        Ok(seen)
    }
}

/// One domain as [`Connection::survey`] sees it.
#[derive(Debug)]
pub struct Surveyed {
    /// Identity, state and vCPU count.
    pub seen: Seen,
    /// For an active domain, its process facts from the status file (or why they could not be
    /// found); `None` when inactive.
    pub process: Option<Result<Found, DiscoverError>>,
}

impl Connection {
    /// Every domain with its state, UUID, name and, for the active ones, QEMU's pid and the
    /// vCPU thread ids: one libvirt call, then each active domain's status file under
    /// `run_dir` checked against `/proc` at `proc_root`.
    pub fn survey(&self, run_dir: &Path, proc_root: &Path) -> Result<Vec<Surveyed>, LibvirtError> {
        Ok(self
            .poll()?
            .into_iter()
            .map(|seen| {
                let process = seen.id.map(|id| {
                    let expected = Expected {
                        uuid: &seen.uuid,
                        name: &seen.name,
                        id,
                        vcpus: seen.vcpus,
                    };
                    discover(run_dir, proc_root, &expected)
                });
                Surveyed { seen, process }
            })
            .collect())
    }
}

/// `(field, integer value)` of typed parameters (non-integers give `None`).
fn typed_params(params: *const ffi::virTypedParameter, n: c_int) -> Vec<(String, Option<i64>)> {
    if params.is_null() || n <= 0 {
        return Vec::new();
    }
    // SAFETY: libvirt gave `n` initialised parameters at `params`.
    let params = unsafe { std::slice::from_raw_parts(params, n as usize) };
    params
        .iter()
        .map(|p| {
            // SAFETY: `field` is a NUL-terminated array of VIR_TYPED_PARAM_FIELD_LENGTH bytes;
            // the union member read is the one `type_` names.
            unsafe {
                let name = CStr::from_ptr(p.field.as_ptr())
                    .to_string_lossy()
                    .into_owned();
                let value = match p.type_ {
                    ffi::VIR_TYPED_PARAM_INT => Some(i64::from(p.value.i)),
                    ffi::VIR_TYPED_PARAM_UINT => Some(i64::from(p.value.ui)),
                    ffi::VIR_TYPED_PARAM_LLONG => Some(p.value.l),
                    ffi::VIR_TYPED_PARAM_ULLONG => i64::try_from(p.value.ul).ok(),
                    _ => None,
                };
                (name, value)
            }
        })
        .collect()
}

impl Drop for Connection {
    fn drop(&mut self) {
        // SAFETY: the connection is closed once; domains hold their own references to it.
        unsafe { ffi::virConnectClose(self.ptr.as_ptr()) };
    }
}

/// What `virDomainGetInfo` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Info {
    /// The state.
    pub state: State,
    /// The most memory the domain may have, KiB.
    pub max_memory_kib: u64,
    /// Its memory now (the balloon target while running), KiB.
    pub memory_kib: u64,
    /// Its vCPUs now.
    pub vcpus: u32,
    /// CPU time of the whole QEMU (vCPUs and emulator), ns.
    pub cpu_time_ns: u64,
}

/// A domain's memory statistics (`virDomainMemoryStats`), KiB; `None` where the guest (its
/// balloon driver) or QEMU gave none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// The balloon's current size as seen by the guest (QEMU `query-balloon` actual).
    pub actual: Option<u64>,
    /// Free memory in the guest (guest-stats `stat-free-memory`).
    pub unused: Option<u64>,
    /// Memory the guest can use (`stat-total-memory`).
    pub available: Option<u64>,
    /// Memory usable without swapping (`stat-available-memory`).
    pub usable: Option<u64>,
    /// QEMU's resident set size on the host.
    pub rss: Option<u64>,
    /// When the guest last updated its statistics, seconds since the epoch.
    pub last_update: Option<u64>,
}

/// A libvirt domain.
#[derive(Debug)]
pub struct Domain {
    ptr: NonNull<ffi::virDomain>,
}

// SAFETY: libvirt domain objects are reference-counted and thread-safe (see Connection).
unsafe impl Send for Domain {}

impl Domain {
    fn check(&self, call: &'static str, rc: c_int) -> Result<c_int, LibvirtError> {
        if rc < 0 {
            Err(LibvirtError::last(call))
        } else {
            Ok(rc)
        }
    }

    /// Its name (no round trip).
    pub fn name(&self) -> String {
        // SAFETY: a valid domain; the returned string belongs to the domain object and is
        // copied at once.
        unsafe {
            let p = ffi::virDomainGetName(self.ptr.as_ptr());
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        }
    }

    /// Its UUID in libvirt's text form (no round trip).
    pub fn uuid(&self) -> String {
        let mut buf = [0 as c_char; ffi::VIR_UUID_STRING_BUFLEN];
        // SAFETY: a valid domain and a buffer of VIR_UUID_STRING_BUFLEN bytes, which libvirt
        // fills with a NUL-terminated string.
        unsafe {
            if ffi::virDomainGetUUIDString(self.ptr.as_ptr(), buf.as_mut_ptr()) < 0 {
                ffi::virResetLastError();
                return String::new();
            }
            CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
        }
    }

    /// Its id while active (no round trip: as of the handle's lookup or listing).
    pub fn id(&self) -> Option<u32> {
        // SAFETY: a valid domain.
        let id = unsafe { ffi::virDomainGetID(self.ptr.as_ptr()) };
        (id != c_uint::MAX).then_some(id)
    }

    /// Its state and libvirt's reason.
    pub fn state(&self) -> Result<(State, i32), LibvirtError> {
        let (mut state, mut reason) = (0, 0);
        // SAFETY: a valid domain and out pointers.
        let rc = unsafe { ffi::virDomainGetState(self.ptr.as_ptr(), &mut state, &mut reason, 0) };
        self.check("virDomainGetState", rc)?;
        Ok((State::from_raw(state), reason))
    }

    /// `virDomainGetInfo`.
    pub fn info(&self) -> Result<Info, LibvirtError> {
        let mut info = ffi::virDomainInfo::default();
        // SAFETY: a valid domain and a virDomainInfo to fill.
        let rc = unsafe { ffi::virDomainGetInfo(self.ptr.as_ptr(), &mut info) };
        self.check("virDomainGetInfo", rc)?;
        // c_ulong is u64 here, u32 on 32-bit targets.
        #[allow(clippy::useless_conversion)]
        Ok(Info {
            state: State::from_raw(i32::from(info.state)),
            max_memory_kib: info.max_mem.into(),
            memory_kib: info.memory.into(),
            vcpus: u32::from(info.nr_virt_cpu),
            cpu_time_ns: info.cpu_time,
        })
    }

    /// Its vCPU count in `scope` (`Live`: now; `Config`: at the next start).
    pub fn vcpus(&self, scope: Scope) -> Result<u32, LibvirtError> {
        // SAFETY: a valid domain.
        let rc = unsafe { ffi::virDomainGetVcpusFlags(self.ptr.as_ptr(), scope.flags()) };
        Ok(self.check("virDomainGetVcpusFlags", rc)? as u32)
    }

    /// Its XML (`inactive`: the persistent definition, else the live one).
    pub fn xml(&self, inactive: bool) -> Result<String, LibvirtError> {
        let flags = if inactive {
            ffi::VIR_DOMAIN_XML_INACTIVE
        } else {
            0
        };
        // SAFETY: a valid domain; the returned string is ours to free.
        let s = unsafe { owned_string(ffi::virDomainGetXMLDesc(self.ptr.as_ptr(), flags)) };
        s.ok_or_else(|| LibvirtError::last("virDomainGetXMLDesc"))
    }

    /// Our metadata element with namespace `ns` in `scope` (`Both` reads the live one), as
    /// libvirt returns it (without its prefix); `None` when the domain has none.
    pub fn metadata(&self, ns: &str, scope: Scope) -> Result<Option<String>, LibvirtError> {
        let uri = cstring("virDomainGetMetadata", ns)?;
        let flags = match scope {
            Scope::Both => ffi::VIR_DOMAIN_AFFECT_LIVE,
            s => s.flags(),
        };
        // SAFETY: valid domain and string; the returned string is ours to free.
        let s = unsafe {
            owned_string(ffi::virDomainGetMetadata(
                self.ptr.as_ptr(),
                ffi::VIR_DOMAIN_METADATA_ELEMENT,
                uri.as_ptr(),
                flags,
            ))
        };
        match s {
            Some(s) => Ok(Some(s)),
            None => {
                let e = LibvirtError::last("virDomainGetMetadata");
                if e.code == ffi::VIR_ERR_NO_DOMAIN_METADATA {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Sets (`Some`) or removes (`None`) our metadata element with namespace `ns` under
    /// prefix `key`.
    pub fn set_metadata(
        &self,
        ns: &str,
        key: &str,
        xml: Option<&str>,
        scope: Scope,
    ) -> Result<(), LibvirtError> {
        let call = "virDomainSetMetadata";
        let uri = cstring(call, ns)?;
        let key = cstring(call, key)?;
        let xml = xml.map(|x| cstring(call, x)).transpose()?;
        // SAFETY: valid domain and strings (a null metadata pointer removes the element).
        let rc = unsafe {
            ffi::virDomainSetMetadata(
                self.ptr.as_ptr(),
                ffi::VIR_DOMAIN_METADATA_ELEMENT,
                xml.as_ref().map_or(ptr::null(), |x| x.as_ptr()),
                key.as_ptr(),
                uri.as_ptr(),
                scope.flags(),
            )
        };
        self.check(call, rc).map(drop)
    }

    /// Starts the (defined, inactive) domain.
    pub fn start(&self) -> Result<(), LibvirtError> {
        // SAFETY: a valid domain.
        let rc = unsafe { ffi::virDomainCreate(self.ptr.as_ptr()) };
        self.check("virDomainCreate", rc).map(drop)
    }

    /// Whether it has a persistent definition (a transient domain vanishes when it stops).
    pub fn is_persistent(&self) -> Result<bool, LibvirtError> {
        // SAFETY: a valid domain.
        let rc = unsafe { ffi::virDomainIsPersistent(self.ptr.as_ptr()) };
        Ok(self.check("virDomainIsPersistent", rc)? == 1)
    }

    /// Asks the guest to power down (`virsh shutdown`, ACPI by default).
    pub fn shutdown(&self) -> Result<(), LibvirtError> {
        // SAFETY: a valid domain.
        let rc = unsafe { ffi::virDomainShutdown(self.ptr.as_ptr()) };
        self.check("virDomainShutdown", rc).map(drop)
    }

    /// Stops it at once (`virsh destroy`).
    pub fn destroy(&self) -> Result<(), LibvirtError> {
        // SAFETY: a valid domain.
        let rc = unsafe { ffi::virDomainDestroy(self.ptr.as_ptr()) };
        self.check("virDomainDestroy", rc).map(drop)
    }

    /// Removes its persistent definition (and a managed save image).
    pub fn undefine(&self) -> Result<(), LibvirtError> {
        // SAFETY: a valid domain.
        let rc = unsafe {
            ffi::virDomainUndefineFlags(self.ptr.as_ptr(), ffi::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
        };
        self.check("virDomainUndefineFlags", rc).map(drop)
    }

    /// Saves the running domain's state to `path` and stops it (`virsh save`).
    pub fn save(&self, path: &Path) -> Result<(), LibvirtError> {
        let c = cstring("virDomainSave", &path.to_string_lossy())?;
        // SAFETY: valid domain and string.
        let rc = unsafe { ffi::virDomainSave(self.ptr.as_ptr(), c.as_ptr()) };
        self.check("virDomainSave", rc).map(drop)
    }

    /// Pauses its vCPUs (`virsh suspend`).
    pub fn suspend(&self) -> Result<(), LibvirtError> {
        // SAFETY: a valid domain.
        let rc = unsafe { ffi::virDomainSuspend(self.ptr.as_ptr()) };
        self.check("virDomainSuspend", rc).map(drop)
    }

    /// Resumes them (`virsh resume`).
    pub fn resume(&self) -> Result<(), LibvirtError> {
        // SAFETY: a valid domain.
        let rc = unsafe { ffi::virDomainResume(self.ptr.as_ptr()) };
        self.check("virDomainResume", rc).map(drop)
    }

    /// Sets the balloon target of the running domain, KiB (`virsh setmem --live`).
    pub fn set_balloon_kib(&self, kib: u64) -> Result<(), LibvirtError> {
        let kib = c_ulong::try_from(kib).unwrap_or(c_ulong::MAX);
        // SAFETY: a valid domain.
        let rc = unsafe {
            ffi::virDomainSetMemoryFlags(self.ptr.as_ptr(), kib, ffi::VIR_DOMAIN_AFFECT_LIVE)
        };
        self.check("virDomainSetMemoryFlags", rc).map(drop)
    }

    /// Asks the guest's balloon driver for statistics every `seconds` (0: never).
    pub fn set_memory_stats_period(&self, seconds: u32, scope: Scope) -> Result<(), LibvirtError> {
        let period = c_int::try_from(seconds).unwrap_or(c_int::MAX);
        // SAFETY: a valid domain.
        let rc =
            unsafe { ffi::virDomainSetMemoryStatsPeriod(self.ptr.as_ptr(), period, scope.flags()) };
        self.check("virDomainSetMemoryStatsPeriod", rc).map(drop)
    }

    /// The domain's memory statistics.
    pub fn memory_stats(&self) -> Result<MemoryStats, LibvirtError> {
        let mut raw = [ffi::virDomainMemoryStatStruct::default(); 16];
        // SAFETY: a valid domain and an array of `raw.len()` entries to fill.
        let n = unsafe {
            ffi::virDomainMemoryStats(self.ptr.as_ptr(), raw.as_mut_ptr(), raw.len() as c_uint, 0)
        };
        let n = self.check("virDomainMemoryStats", n)? as usize;
        let get = |tag: c_int| {
            raw[..n.min(raw.len())]
                .iter()
                .find(|s| s.tag == tag)
                .map(|s| s.val)
        };
        Ok(MemoryStats {
            actual: get(ffi::VIR_DOMAIN_MEMORY_STAT_ACTUAL_BALLOON),
            unused: get(ffi::VIR_DOMAIN_MEMORY_STAT_UNUSED),
            available: get(ffi::VIR_DOMAIN_MEMORY_STAT_AVAILABLE),
            usable: get(ffi::VIR_DOMAIN_MEMORY_STAT_USABLE),
            rss: get(ffi::VIR_DOMAIN_MEMORY_STAT_RSS),
            last_update: get(ffi::VIR_DOMAIN_MEMORY_STAT_LAST_UPDATE),
        })
    }

    /// Pins vCPU `vcpu` to host CPUs `cpus` (`virsh vcpupin`): libvirt writes the vCPU's
    /// cpuset cgroup and calls `sched_setaffinity` on its thread, and records the pin in the
    /// domain XML, so `virsh vcpupin` shows it.
    pub fn pin_vcpu(&self, vcpu: u32, cpus: &[u32], scope: Scope) -> Result<(), LibvirtError> {
        let mut map = cpu_map(cpus);
        // SAFETY: a valid domain and a map of `map.len()` bytes.
        let rc = unsafe {
            ffi::virDomainPinVcpuFlags(
                self.ptr.as_ptr(),
                vcpu,
                map.as_mut_ptr(),
                map.len() as c_int,
                scope.flags(),
            )
        };
        self.check("virDomainPinVcpuFlags", rc).map(drop)
    }

    /// Each vCPU's allowed host CPUs in `scope` (`Both` reads the live ones).
    pub fn vcpu_pins(&self, scope: Scope) -> Result<Vec<Vec<u32>>, LibvirtError> {
        let vcpus = self.vcpus(match scope {
            Scope::Config => Scope::Config,
            _ => Scope::Live,
        })? as usize;
        let maplen = host_cpus().div_ceil(8).max(1);
        let mut maps = vec![0u8; vcpus * maplen];
        let flags = match scope {
            Scope::Both => ffi::VIR_DOMAIN_AFFECT_LIVE,
            s => s.flags(),
        };
        // SAFETY: a valid domain and `vcpus` maps of `maplen` bytes each.
        let n = unsafe {
            ffi::virDomainGetVcpuPinInfo(
                self.ptr.as_ptr(),
                vcpus as c_int,
                maps.as_mut_ptr(),
                maplen as c_int,
                flags,
            )
        };
        let n = self.check("virDomainGetVcpuPinInfo", n)? as usize;
        Ok(maps
            .chunks(maplen)
            .take(n)
            .map(|m| {
                (0..m.len() * 8)
                    .filter(|&cpu| m[cpu / 8] & (1 << (cpu % 8)) != 0)
                    .map(|cpu| cpu as u32)
                    .collect()
            })
            .collect())
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        // SAFETY: releases the one reference this Domain owns.
        unsafe { ffi::virDomainFree(self.ptr.as_ptr()) };
    }
}

/// The host's configured CPU count (the width of libvirt's CPU maps).
fn host_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// libvirt's CPU bitmap: bit `c % 8` of byte `c / 8` for CPU `c`, as wide as the host.
pub fn cpu_map(cpus: &[u32]) -> Vec<u8> {
    let widest = cpus.iter().map(|&c| c as usize + 1).max().unwrap_or(0);
    let mut map = vec![0u8; host_cpus().max(widest).div_ceil(8)];
    for &c in cpus {
        map[c as usize / 8] |= 1 << (c % 8);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_maps_set_one_bit_per_cpu() {
        let map = cpu_map(&[0, 3, 9]);
        assert!(map.len() >= 2);
        assert_eq!(map[0], 0b0000_1001);
        assert_eq!(map[1], 0b0000_0010);
        assert!(cpu_map(&[]).iter().all(|&b| b == 0));
    }

    #[test]
    fn a_bad_uri_is_an_error_with_libvirts_message() {
        let e = Connection::open("nosuchdriver:///x").unwrap_err();
        assert_eq!(e.call, "virConnectOpen");
        assert!(!e.message.is_empty());
    }
}
