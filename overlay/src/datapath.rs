//! ferry's eBPF datapath: loads the object built by build.rs, attaches one program per attach
//! point (tcx on this kernel), and gives typed access to the maps.
//!
//! With a pin directory (one per host, on bpffs) the datapath outlives the agent: the maps are
//! pinned (`<dir>/<MAP>`) and every tcx link too (`<dir>/links/<program>__<interface>`), so the
//! programs stay attached while no agent runs. The next [`Datapath::attach`] re-opens the
//! pinned maps (their entries and counters go on) and loads the programs against them, then
//! moves every pinned link to the newly loaded program atomically (`BPF_LINK_UPDATE`: the
//! interface is never without a program, and an upgrade's new code takes over in one step).
//! [`remove_pins`] is the explicit teardown.

use std::{
    collections::HashMap as StdHashMap,
    ffi::CString,
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, TestRun, TestRunOptions,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TcAttachType, links::FdLink, tc::SchedClassifierLinkId},
};
use ferry_common::{
    Config, Counter, Endpoint, NatKey, NatValue, Reason, Vtep, ipv4_be, maps, programs,
};

/// Run-time statistics of ferry's programs loaded on this machine (every lab host's agents
/// load their own copies: summed by name).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: &'static str,
    /// Time spent in the program (only counted while statistics are enabled).
    pub run_ns: u64,
    pub runs: u64,
}

/// Turns the kernel's per-program run-time statistics on (`BPF_ENABLE_STATS`) for as long as
/// the returned descriptor lives. For measurements: it costs two clock reads per run.
pub fn enable_run_time_stats() -> std::io::Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// [`ProgramStats`] of every ferry program, by name (all copies on the machine summed).
pub fn program_stats() -> Vec<ProgramStats> {
    let names = PROGRAMS;
    let mut out: Vec<ProgramStats> = names
        .iter()
        .map(|&name| ProgramStats {
            name,
            ..ProgramStats::default()
        })
        .collect();
    for info in aya::programs::loaded_programs().flatten() {
        let Some(name) = info.name_as_str() else {
            continue;
        };
        if let Some(s) = out.iter_mut().find(|s| s.name == name) {
            s.run_ns += u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
            s.runs += info.run_count();
        }
    }
    out
}

/// The eBPF object, built by overlay/build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("attaching {name} to {interface}: {source}")]
    Attach {
        name: &'static str,
        interface: String,
        source: aya::programs::ProgramError,
    },
    #[error("{name} is not attached to {interface}")]
    NotAttached {
        name: &'static str,
        interface: String,
    },
    #[error("test run of {name}: {source}")]
    TestRun {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("creating {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pinning the link of {name} on {interface}: {source}")]
    PinLink {
        name: &'static str,
        interface: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("unpinning {path}: {source}")]
    Unpin {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How the datapath found its pin directory at [`Datapath::attach`].
#[derive(Debug, Clone, Default)]
pub struct Adoption {
    /// Maps that were already pinned and were re-opened (entries and counters kept).
    pub maps_reused: Vec<&'static str>,
    /// Pinned links moved to the newly loaded programs: (program, interface).
    pub links_adopted: Vec<(&'static str, String)>,
    /// Pinned links whose interface is gone (or that could not be updated): unpinned.
    pub links_dropped: Vec<String>,
    /// The configuration the re-opened config map held (its registry-derived parts, such as
    /// the egress VTEP, are worth keeping until the registry is heard again).
    pub previous_config: Option<Config>,
    /// The pinned endpoint map had another capacity or flags (an older agent's): replaced by a
    /// new one, this many entries copied over before the programs moved to it.
    pub endpoints_copied: Option<usize>,
}

/// One program attached to one interface.
enum Attached {
    /// Owned by the loaded object (no pin directory): detached when the datapath drops.
    Owned(SchedClassifierLinkId),
    /// Pinned on bpffs (this file): stays attached until the file is removed and no fd holds
    /// the link.
    Pinned(PathBuf),
}

/// Sub-directory of the pin directory that holds the pinned links.
const LINKS_DIR: &str = "links";
/// The maps, all pinned by name.
const MAPS: [&str; 6] = [
    maps::CONFIG,
    maps::COUNTERS,
    maps::ENDPOINTS,
    maps::VTEPS,
    maps::PUBLIC,
    maps::SNAT,
];
/// The programs, all loaded at start.
const PROGRAMS: [&str; 6] = [
    programs::FROM_OVERLAY,
    programs::TO_OVERLAY,
    programs::FROM_CONTAINER,
    programs::FROM_PUBLIC,
    programs::FROM_HOLD,
    programs::FROM_UNDERLAY,
];

/// Where program `name` attaches (every program but to-overlay on ingress).
fn attach_type(name: &str) -> TcAttachType {
    if name == programs::TO_OVERLAY {
        TcAttachType::Egress
    } else {
        TcAttachType::Ingress
    }
}

/// File name of a pinned link: `<program>__<interface>`, with `%` and `.` escaped (bpffs
/// refuses dots in names).
pub fn link_pin_name(program: &str, interface: &str) -> String {
    let iface = interface.replace('%', "%25").replace('.', "%2e");
    format!("{program}__{iface}")
}

/// The (program, interface) a pinned link's file name stands for.
pub fn parse_link_pin_name(name: &str) -> Option<(&'static str, String)> {
    let (program, iface) = name.split_once("__")?;
    let program = PROGRAMS.into_iter().find(|p| *p == program)?;
    let iface = iface.replace("%2e", ".").replace("%25", "%");
    (!iface.is_empty()).then_some((program, iface))
}

/// Counters of one reason, summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReasonCount {
    pub reason: Reason,
    pub packets: u64,
    pub bytes: u64,
}

/// What a program did with a packet under `BPF_PROG_TEST_RUN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRunOutput {
    /// The program's return value (`TC_ACT_*`).
    pub action: i32,
    /// The frame as the program left it.
    pub packet: Vec<u8>,
}

/// The loaded and attached datapath. Without a pin directory, dropping it detaches the
/// programs (tcx links are owned by their file descriptors). With one, everything stays pinned
/// and attached when it drops (an agent restart); [`remove_pins`] takes it all away.
pub struct Datapath {
    ebpf: Ebpf,
    config: Array<MapData, Config>,
    counters: PerCpuArray<MapData, Counter>,
    endpoints: HashMap<MapData, u32, Endpoint>,
    vteps: HashMap<MapData, u32, Vtep>,
    public: HashMap<MapData, NatKey, NatValue>,
    snat: HashMap<MapData, NatKey, NatValue>,
    /// Every attachment: (program, interface).
    links: StdHashMap<(&'static str, String), Attached>,
    pin_dir: Option<PathBuf>,
    adoption: Adoption,
}

impl Datapath {
    /// Loads the object, writes `config`, and attaches from-overlay (ingress) and to-overlay
    /// (egress) to the VXLAN device `vxlan`. With `pin_dir` (one directory per host), maps
    /// and links are pinned there, and whatever an earlier agent pinned is adopted: its maps
    /// re-opened, its links moved to the programs loaded now (see the module's doc; what was
    /// found is in [`Datapath::adoption`]). A re-opened configuration keeps its egress VTEP
    /// (the registry decides it; `config`'s is ignored then).
    pub fn attach(
        vxlan: &str,
        config: Config,
        pin_dir: Option<&Path>,
    ) -> Result<Self, DatapathError> {
        let mut loader = EbpfLoader::new();
        let mut maps_reused = Vec::new();
        let map_paths: Vec<(&'static str, PathBuf)> = match pin_dir {
            Some(dir) => {
                let links = dir.join(LINKS_DIR);
                std::fs::create_dir_all(&links).map_err(|source| DatapathError::PinDir {
                    path: links.clone(),
                    source,
                })?;
                MAPS.iter().map(|m| (*m, dir.join(m))).collect()
            }
            None => Vec::new(),
        };
        // An endpoint map pinned by an agent of another size or kind (an upgrade across a
        // change of `MAX_ENDPOINTS`) is set aside: a new one is created, the old one's entries
        // copied into it before any program uses it (below).
        let mut resized = None;
        for (name, path) in &map_paths {
            if *name == maps::ENDPOINTS && path.exists() {
                resized = set_aside_if_resized(path)?;
            }
            if path.exists() {
                maps_reused.push(*name);
            }
            // Re-opened if pinned, created and pinned otherwise.
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT)?;
        for name in PROGRAMS {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        let mut take = |name: &'static str| -> Result<aya::maps::Map, DatapathError> {
            ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))
        };
        let (cfg_map, counters, endpoints, vteps, public, snat) = (
            take(maps::CONFIG)?,
            take(maps::COUNTERS)?,
            take(maps::ENDPOINTS)?,
            take(maps::VTEPS)?,
            take(maps::PUBLIC)?,
            take(maps::SNAT)?,
        );
        let mut dp = Self {
            config: typed(cfg_map, maps::CONFIG)?,
            counters: typed(counters, maps::COUNTERS)?,
            endpoints: typed(endpoints, maps::ENDPOINTS)?,
            vteps: typed(vteps, maps::VTEPS)?,
            public: typed(public, maps::PUBLIC)?,
            snat: typed(snat, maps::SNAT)?,
            ebpf,
            links: StdHashMap::new(),
            pin_dir: pin_dir.map(Path::to_owned),
            adoption: Adoption::default(),
        };
        let mut config = config;
        if maps_reused.contains(&maps::CONFIG) {
            dp.adoption.previous_config = dp.config().ok();
            // Where traffic for outside the overlay goes is the registry's to say, not this
            // start's: kept until the agent hears the registry again.
            if let Some(prev) = dp.adoption.previous_config {
                config.egress_vtep_be = prev.egress_vtep_be;
                config.flags |= prev.flags & ferry_common::config_flags::PUBLIC_STANDBY;
            }
        }
        dp.adoption.maps_reused = maps_reused;
        if let Some(old) = resized {
            dp.adoption.endpoints_copied = Some(dp.copy_endpoints_from(old)?);
        }
        dp.adopt_links()?;
        dp.set_config(config)?;
        dp.attach_to(programs::FROM_OVERLAY, vxlan)?;
        dp.attach_to(programs::TO_OVERLAY, vxlan)?;
        Ok(dp)
    }

    /// What [`Datapath::attach`] found pinned and took over.
    pub fn adoption(&self) -> &Adoption {
        &self.adoption
    }

    /// Takes over the links pinned by an earlier agent: each is moved to the program of its
    /// name loaded now (one atomic `BPF_LINK_UPDATE`: the interface keeps a program
    /// throughout). A link whose interface has gone cannot be updated (`ENOLINK`): unpinned.
    fn adopt_links(&mut self) -> Result<(), DatapathError> {
        let Some(dir) = self.pin_dir.as_ref().map(|d| d.join(LINKS_DIR)) else {
            return Ok(());
        };
        let entries = std::fs::read_dir(&dir).map_err(|source| DatapathError::PinDir {
            path: dir.clone(),
            source,
        })?;
        let mut files: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
        files.sort();
        for path in files {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let Some((program, iface)) = parse_link_pin_name(name) else {
                tracing::warn!(path = %path.display(), "unknown entry among the pinned links: removed");
                let _ = std::fs::remove_file(&path);
                self.adoption.links_dropped.push(name.to_owned());
                continue;
            };
            let prog_fd = classifier(&mut self.ebpf, program)?
                .fd()
                .map_err(|source| DatapathError::Program {
                    name: program,
                    source,
                })?
                .as_fd()
                .as_raw_fd();
            let updated = bpf_obj_get(&path).and_then(|link| link_update(&link, prog_fd));
            match updated {
                Ok(()) => {
                    tracing::info!(program, interface = %iface, "pinned link adopted");
                    self.adoption.links_adopted.push((program, iface.clone()));
                    self.links.insert((program, iface), Attached::Pinned(path));
                }
                Err(e) => {
                    tracing::info!(program, interface = %iface, error = %e, "pinned link not adoptable (interface gone?): unpinned");
                    let _ = std::fs::remove_file(&path);
                    self.adoption.links_dropped.push(name.to_owned());
                }
            }
        }
        Ok(())
    }

    /// Replaces the configuration (e.g. when the gateway's VTEP becomes known).
    pub fn set_config(&mut self, config: Config) -> Result<(), DatapathError> {
        self.config.set(0, config, 0).map_err(map_err(maps::CONFIG))
    }

    pub fn config(&self) -> Result<Config, DatapathError> {
        self.config.get(&0, 0).map_err(map_err(maps::CONFIG))
    }

    /// Attaches from-container to the ingress of a container's host-side veth.
    pub fn attach_container(&mut self, interface: &str) -> Result<(), DatapathError> {
        self.attach_to(programs::FROM_CONTAINER, interface)
    }

    /// Detaches from-container from a veth (a no-op error if it was not attached).
    pub fn detach_container(&mut self, interface: &str) -> Result<(), DatapathError> {
        self.detach(programs::FROM_CONTAINER, interface)
    }

    /// Gateway: attaches from-public to the ingress of the internet-facing interface.
    pub fn attach_public(&mut self, interface: &str) -> Result<(), DatapathError> {
        self.attach_to(programs::FROM_PUBLIC, interface)
    }

    /// No-tunnel mode: attaches from-underlay to the ingress of the host's underlay interface.
    pub fn attach_underlay(&mut self, interface: &str) -> Result<(), DatapathError> {
        self.attach_to(programs::FROM_UNDERLAY, interface)
    }

    /// Attaches from-hold to the ingress of the agent's hold device.
    pub fn attach_hold(&mut self, interface: &str) -> Result<(), DatapathError> {
        self.attach_to(programs::FROM_HOLD, interface)
    }

    /// Interfaces from-container is attached to.
    pub fn container_interfaces(&self) -> Vec<String> {
        self.links
            .keys()
            .filter(|(p, _)| *p == programs::FROM_CONTAINER)
            .map(|(_, i)| i.clone())
            .collect()
    }

    /// Attaches program `name` to `interface` (ingress, or egress for to-overlay), pinned if
    /// the datapath has a pin directory. Already attached (or adopted): nothing to do.
    fn attach_to(&mut self, name: &'static str, interface: &str) -> Result<(), DatapathError> {
        let key = (name, interface.to_owned());
        if self.links.contains_key(&key) {
            return Ok(());
        }
        let attach_err = |source| DatapathError::Attach {
            name,
            interface: interface.to_owned(),
            source,
        };
        let program = classifier(&mut self.ebpf, name)?;
        let id = program
            .attach(interface, attach_type(name))
            .map_err(attach_err)?;
        let Some(dir) = &self.pin_dir else {
            self.links.insert(key, Attached::Owned(id));
            return Ok(());
        };
        let pin_err = |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::PinLink {
            name,
            interface: interface.to_owned(),
            source,
        };
        let link = program.take_link(id).map_err(attach_err)?;
        let fd: FdLink = link.try_into().map_err(|e| pin_err(Box::new(e)))?;
        let path = dir.join(LINKS_DIR).join(link_pin_name(name, interface));
        let _ = std::fs::remove_file(&path);
        // On failure the link's fd closes here, which detaches it again. On success the pin
        // holds the link; its fd closes as `pinned` drops.
        let pinned = fd.pin(&path).map_err(|e| pin_err(Box::new(e)))?;
        drop(pinned);
        self.links.insert(key, Attached::Pinned(path));
        Ok(())
    }

    fn detach(&mut self, name: &'static str, interface: &str) -> Result<(), DatapathError> {
        let attached = self
            .links
            .remove(&(name, interface.to_owned()))
            .ok_or_else(|| DatapathError::NotAttached {
                name,
                interface: interface.to_owned(),
            })?;
        match attached {
            Attached::Owned(id) => classifier(&mut self.ebpf, name)?
                .detach(id)
                .map_err(|source| DatapathError::Attach {
                    name,
                    interface: interface.to_owned(),
                    source,
                }),
            // The pin was the link's last reference: removing it detaches the program.
            Attached::Pinned(path) => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(DatapathError::Unpin { path, source: e })
                }
                _ => Ok(()),
            },
        }
    }

    pub fn set_public(&mut self, key: NatKey, value: NatValue) -> Result<(), DatapathError> {
        self.public
            .insert(key, value, 0)
            .map_err(map_err(maps::PUBLIC))
    }

    pub fn remove_public(&mut self, key: &NatKey) -> Result<(), DatapathError> {
        self.public.remove(key).map_err(map_err(maps::PUBLIC))
    }

    pub fn set_snat(&mut self, key: NatKey, value: NatValue) -> Result<(), DatapathError> {
        self.snat.insert(key, value, 0).map_err(map_err(maps::SNAT))
    }

    pub fn remove_snat(&mut self, key: &NatKey) -> Result<(), DatapathError> {
        self.snat.remove(key).map_err(map_err(maps::SNAT))
    }

    pub fn public_count(&self) -> usize {
        self.public.keys().filter(Result::is_ok).count()
    }

    pub fn snat_count(&self) -> usize {
        self.snat.keys().filter(Result::is_ok).count()
    }

    pub fn set_endpoint(&mut self, ip: Ipv4Addr, ep: Endpoint) -> Result<(), DatapathError> {
        self.endpoints
            .insert(ipv4_be(ip.octets()), ep, 0)
            .map_err(map_err(maps::ENDPOINTS))
    }

    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        self.endpoints
            .remove(&ipv4_be(ip.octets()))
            .map_err(map_err(maps::ENDPOINTS))
    }

    pub fn endpoint(&self, ip: Ipv4Addr) -> Option<Endpoint> {
        self.endpoints.get(&ipv4_be(ip.octets()), 0).ok()
    }

    /// Every endpoint entry in the map (an adopted map holds what the previous agent wrote).
    pub fn endpoints(&self) -> Vec<(Ipv4Addr, Endpoint)> {
        self.endpoints
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (Ipv4Addr::from(u32::from_be(k)), v))
            .collect()
    }

    /// Every VTEP in the allow-list.
    pub fn vtep_ips(&self) -> Vec<Ipv4Addr> {
        self.vteps
            .keys()
            .filter_map(Result::ok)
            .map(|k| Ipv4Addr::from(u32::from_be(k)))
            .collect()
    }

    /// Every public (inbound translation) key.
    pub fn public_keys(&self) -> Vec<NatKey> {
        self.public.keys().filter_map(Result::ok).collect()
    }

    /// Every SNAT (outbound translation) key.
    pub fn snat_keys(&self) -> Vec<NatKey> {
        self.snat.keys().filter_map(Result::ok).collect()
    }

    /// Copies every entry of `old` (an older agent's endpoint map) into this one.
    fn copy_endpoints_from(&mut self, old: MapData) -> Result<usize, DatapathError> {
        let old: HashMap<MapData, u32, Endpoint> =
            HashMap::try_from(aya::maps::Map::HashMap(old)).map_err(map_err(maps::ENDPOINTS))?;
        let mut n = 0;
        for entry in old.iter() {
            let (k, v) = entry.map_err(map_err(maps::ENDPOINTS))?;
            self.endpoints
                .insert(k, v, 0)
                .map_err(map_err(maps::ENDPOINTS))?;
            n += 1;
        }
        Ok(n)
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints.keys().filter(Result::is_ok).count()
    }

    pub fn allow_vtep(&mut self, ip: Ipv4Addr, vtep: Vtep) -> Result<(), DatapathError> {
        self.vteps
            .insert(ipv4_be(ip.octets()), vtep, 0)
            .map_err(map_err(maps::VTEPS))
    }

    pub fn disallow_vtep(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        self.vteps
            .remove(&ipv4_be(ip.octets()))
            .map_err(map_err(maps::VTEPS))
    }

    pub fn vtep_count(&self) -> usize {
        self.vteps.keys().filter(Result::is_ok).count()
    }

    /// Per-reason counters summed over all CPUs, in reason order.
    pub fn counters(&self) -> Result<Vec<ReasonCount>, DatapathError> {
        Reason::ALL
            .iter()
            .map(|&reason| {
                let per_cpu = self
                    .counters
                    .get(&(reason as u32), 0)
                    .map_err(map_err(maps::COUNTERS))?;
                let (packets, bytes) = per_cpu
                    .iter()
                    .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
                Ok(ReasonCount {
                    reason,
                    packets,
                    bytes,
                })
            })
            .collect()
    }

    /// Runs the loaded program `name` once on `frame` (Ethernet) with `BPF_PROG_TEST_RUN`, as
    /// if it had come in on device `ifindex`, which must exist in the calling thread's network
    /// namespace (0: the loopback device). The maps are the live ones, so the counters move; a
    /// redirect is returned (`TC_ACT_REDIRECT`) but not carried out. For tests.
    pub fn test_run(
        &self,
        name: &'static str,
        ifindex: u32,
        frame: &[u8],
    ) -> Result<TestRunOutput, DatapathError> {
        let program: &SchedClassifier = self
            .ebpf
            .program(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })?;
        // The context is a `struct __sk_buff` (not in aya's bindings); the kernel accepts a
        // zero-padded prefix and takes only (ingress_)ifindex, mark, priority, cb and a few
        // others from it: (ingress_ifindex, ifindex) are its 10th and 11th u32.
        let mut skb = [0u32; 11];
        skb[9] = ifindex;
        skb[10] = ifindex;
        let ctx: Vec<u8> = skb.iter().flat_map(|w| w.to_ne_bytes()).collect();
        // Room for programs that grow the frame (none of ferry's do today).
        let mut out = vec![0u8; frame.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::new()
            })
            .map_err(|source| DatapathError::TestRun { name, source })?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput {
            action: result.return_value as i32,
            packet: out,
        })
    }
}

/// Removes everything a datapath pinned under `dir`: the links first (each program is
/// detached as its last reference goes), then the maps, then the directories. Missing: fine.
/// The explicit teardown (an agent that stops keeps its pins, see the module's doc).
pub fn remove_pins(dir: &Path) -> Result<(), DatapathError> {
    let unpin = |path: PathBuf, source| DatapathError::Unpin { path, source };
    let links = dir.join(LINKS_DIR);
    match std::fs::read_dir(&links) {
        Ok(entries) => {
            for e in entries.filter_map(Result::ok) {
                std::fs::remove_file(e.path()).map_err(|s| unpin(e.path(), s))?;
            }
            std::fs::remove_dir(&links).map_err(|s| unpin(links.clone(), s))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(unpin(links, e)),
    }
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries.filter_map(Result::ok) {
                std::fs::remove_file(e.path()).map_err(|s| unpin(e.path(), s))?;
            }
            std::fs::remove_dir(dir).map_err(|s| unpin(dir.to_owned(), s))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(unpin(dir.to_owned(), e)),
    }
}

/// `BPF_OBJ_GET`: an fd on the object pinned at `path`.
fn bpf_obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // union bpf_attr for BPF_OBJ_GET: pathname (u64), bpf_fd (u32), file_flags (u32),
    // path_fd (s32); the rest zero.
    let mut attr = [0u64; 3];
    attr[0] = c.as_ptr() as u64;
    // SAFETY: bpf(2) reads `size_of_val(&attr)` bytes of `attr`, which outlives the call, and
    // the NUL-terminated path it points to; it returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE`: link `link` runs program `prog_fd` from now on (atomically).
fn link_update(link: &OwnedFd, prog_fd: RawFd) -> std::io::Result<()> {
    // union bpf_attr for BPF_LINK_UPDATE: link_fd, new_prog_fd, flags, old_prog_fd (u32 each).
    let mut attr = [0u32; 4];
    attr[0] = link.as_raw_fd() as u32;
    attr[1] = prog_fd as u32;
    // SAFETY: bpf(2) reads `size_of_val(&attr)` bytes of `attr`, which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// bpf(2) commands (linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

/// If the endpoint map pinned at `path` differs from the one this build creates (capacity,
/// flags), opens it, removes its pin (programs still attached keep it alive) and returns it.
fn set_aside_if_resized(path: &Path) -> Result<Option<MapData>, DatapathError> {
    let info = aya::maps::MapInfo::from_pin(path).map_err(map_err(maps::ENDPOINTS))?;
    if info.max_entries() == ferry_common::MAX_ENDPOINTS
        && info.map_flags() == ferry_common::ENDPOINTS_MAP_FLAGS
    {
        return Ok(None);
    }
    let old = MapData::from_pin(path).map_err(map_err(maps::ENDPOINTS))?;
    std::fs::remove_file(path).map_err(|source| DatapathError::Unpin {
        path: path.to_owned(),
        source,
    })?;
    tracing::info!(
        path = %path.display(),
        max_entries = info.max_entries(),
        flags = info.map_flags(),
        want_max_entries = ferry_common::MAX_ENDPOINTS,
        want_flags = ferry_common::ENDPOINTS_MAP_FLAGS,
        "the pinned endpoint map is an older agent's: replacing it, entries copied"
    );
    Ok(Some(old))
}

fn typed<T>(map: aya::maps::Map, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    T::try_from(map).map_err(map_err(name))
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}
