//! ferry's eBPF datapath: loads the object built by build.rs, attaches one program per attach
//! point (tcx on this kernel), and gives typed access to the maps.

use std::{
    collections::HashMap as StdHashMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, TestRun, TestRunOptions,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TcAttachType, tc::SchedClassifierLinkId},
};
use ferry_common::{
    Config, Counter, Endpoint, NatKey, NatValue, Reason, Vtep, ipv4_be, maps, programs,
};

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

/// The loaded and attached datapath. Dropping it detaches the programs (tcx links are owned by
/// their file descriptors) and removes what it pinned.
pub struct Datapath {
    ebpf: Ebpf,
    config: Array<MapData, Config>,
    counters: PerCpuArray<MapData, Counter>,
    endpoints: HashMap<MapData, u32, Endpoint>,
    vteps: HashMap<MapData, u32, Vtep>,
    public: HashMap<MapData, NatKey, NatValue>,
    snat: HashMap<MapData, NatKey, NatValue>,
    /// Per-interface attachments made after start (container veths, the public interface).
    links: StdHashMap<(&'static str, String), SchedClassifierLinkId>,
    pinned: Vec<PathBuf>,
}

impl Datapath {
    /// Loads the object, writes `config`, and attaches from-overlay (ingress) and to-overlay
    /// (egress) to the VXLAN device `vxlan`. With `pin_dir`, the maps are pinned there (one
    /// directory per host) for inspection with bpftool.
    pub fn attach(
        vxlan: &str,
        config: Config,
        pin_dir: Option<&Path>,
    ) -> Result<Self, DatapathError> {
        let mut ebpf = EbpfLoader::new().load(OBJECT)?;
        for name in [
            programs::FROM_OVERLAY,
            programs::TO_OVERLAY,
            programs::FROM_CONTAINER,
            programs::FROM_PUBLIC,
            programs::FROM_HOLD,
        ] {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        for (name, attach) in [
            (programs::FROM_OVERLAY, TcAttachType::Ingress),
            (programs::TO_OVERLAY, TcAttachType::Egress),
        ] {
            classifier(&mut ebpf, name)?
                .attach(vxlan, attach)
                .map_err(|source| DatapathError::Attach {
                    name,
                    interface: vxlan.to_owned(),
                    source,
                })?;
        }
        let mut pinned = Vec::new();
        if let Some(dir) = pin_dir {
            std::fs::create_dir_all(dir).map_err(|source| DatapathError::PinDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let mut take_pinned = |name: &'static str| -> Result<aya::maps::Map, DatapathError> {
            let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
            if let Some(dir) = pin_dir {
                let path = dir.join(name);
                let _ = std::fs::remove_file(&path);
                map.pin(&path).map_err(|source| DatapathError::Pin {
                    path: path.clone(),
                    source,
                })?;
                pinned.push(path);
            }
            Ok(map)
        };
        let cfg_map = take_pinned(maps::CONFIG)?;
        let counters = take_pinned(maps::COUNTERS)?;
        let endpoints = take_pinned(maps::ENDPOINTS)?;
        let vteps = take_pinned(maps::VTEPS)?;
        let public = take_pinned(maps::PUBLIC)?;
        let snat = take_pinned(maps::SNAT)?;
        let mut dp = Self {
            config: typed(cfg_map, maps::CONFIG)?,
            counters: typed(counters, maps::COUNTERS)?,
            endpoints: typed(endpoints, maps::ENDPOINTS)?,
            vteps: typed(vteps, maps::VTEPS)?,
            public: typed(public, maps::PUBLIC)?,
            snat: typed(snat, maps::SNAT)?,
            ebpf,
            links: StdHashMap::new(),
            pinned,
        };
        dp.set_config(config)?;
        Ok(dp)
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
        self.attach_ingress(programs::FROM_CONTAINER, interface)
    }

    /// Detaches from-container from a veth (a no-op error if it was not attached).
    pub fn detach_container(&mut self, interface: &str) -> Result<(), DatapathError> {
        self.detach(programs::FROM_CONTAINER, interface)
    }

    /// Gateway: attaches from-public to the ingress of the internet-facing interface.
    pub fn attach_public(&mut self, interface: &str) -> Result<(), DatapathError> {
        self.attach_ingress(programs::FROM_PUBLIC, interface)
    }

    /// Attaches from-hold to the ingress of the agent's hold device.
    pub fn attach_hold(&mut self, interface: &str) -> Result<(), DatapathError> {
        self.attach_ingress(programs::FROM_HOLD, interface)
    }

    /// Interfaces from-container is attached to.
    pub fn container_interfaces(&self) -> Vec<String> {
        self.links
            .keys()
            .filter(|(p, _)| *p == programs::FROM_CONTAINER)
            .map(|(_, i)| i.clone())
            .collect()
    }

    fn attach_ingress(&mut self, name: &'static str, interface: &str) -> Result<(), DatapathError> {
        let key = (name, interface.to_owned());
        if self.links.contains_key(&key) {
            return Ok(());
        }
        let id = classifier(&mut self.ebpf, name)?
            .attach(interface, TcAttachType::Ingress)
            .map_err(|source| DatapathError::Attach {
                name,
                interface: interface.to_owned(),
                source,
            })?;
        self.links.insert(key, id);
        Ok(())
    }

    fn detach(&mut self, name: &'static str, interface: &str) -> Result<(), DatapathError> {
        let id = self
            .links
            .remove(&(name, interface.to_owned()))
            .ok_or_else(|| DatapathError::NotAttached {
                name,
                interface: interface.to_owned(),
            })?;
        classifier(&mut self.ebpf, name)?
            .detach(id)
            .map_err(|source| DatapathError::Attach {
                name,
                interface: interface.to_owned(),
                source,
            })
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

impl Drop for Datapath {
    fn drop(&mut self) {
        for p in &self.pinned {
            if let Err(e) = std::fs::remove_file(p) {
                tracing::warn!(path = %p.display(), error = %e, "unpinning map");
            }
        }
        if let Some(dir) = self.pinned.first().and_then(|p| p.parent()) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
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
