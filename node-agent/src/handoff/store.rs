//! Hand-off packages: what a source agent sends to the destination agent, and where they wait
//! (in memory, bounded) until the new process claims them. A package is handed out once.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::Mutex,
    time::{Duration, Instant},
};

use ferry_tcp_repair::TcpState;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// An unclaimed package is dropped after this long (the migration was abandoned).
pub const PACKAGE_TTL: Duration = Duration::from_secs(600);
/// How long a claimed package is remembered, so a second claim gets a clear answer.
pub const CLAIMED_TTL: Duration = Duration::from_secs(600);

/// What moves: a container's dumped TCP connections and the exporting process's opaque state.
/// The JSON body of `POST /v1/handoff/{container}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Package {
    pub container: Ipv4Addr,
    /// The exporting host.
    pub from: String,
    /// In the order the process exported them (and gets them back).
    pub sockets: Vec<TcpState>,
    /// The process's state, opaque to ferry (base64 in JSON).
    #[serde(with = "b64")]
    pub state: Vec<u8>,
}

#[derive(Debug)]
enum Slot {
    Ready {
        package: Package,
        bytes: u64,
        since: Instant,
    },
    /// Taken by a claim that is restoring it; it comes back if the restore fails.
    Claiming,
    Claimed {
        at: Instant,
        sockets: usize,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error(
        "a package of {bytes} bytes does not fit: {stored} of {max} bytes are taken by packages waiting to be claimed"
    )]
    Full { bytes: u64, stored: u64, max: u64 },
    #[error("the package for {0} is being claimed right now")]
    BeingClaimed(Ipv4Addr),
    #[error(
        "the package for {container} was already claimed {ago_ms} ms ago ({sockets} sockets): a package is handed out once"
    )]
    AlreadyClaimed {
        container: Ipv4Addr,
        ago_ms: u64,
        sockets: usize,
    },
    #[error(
        "no package for {container} arrived within {waited_ms} ms (export it on the source host first)"
    )]
    NoPackage { container: Ipv4Addr, waited_ms: u64 },
}

/// A package taken by a claim: give it back with [`Store::put_back`] or settle it with
/// [`Store::claimed`].
#[derive(Debug)]
pub struct Taken {
    pub package: Package,
    bytes: u64,
    pub waited: Duration,
}

#[derive(Debug, Default)]
struct Inner {
    slots: HashMap<Ipv4Addr, Slot>,
    /// Bytes of `Ready` and `Claiming` packages.
    bytes: u64,
}

impl Inner {
    fn prune(&mut self, now: Instant) {
        let mut freed = 0;
        self.slots.retain(|_, s| match s {
            Slot::Ready { bytes, since, .. } if now - *since > PACKAGE_TTL => {
                freed += *bytes;
                false
            }
            Slot::Claimed { at, .. } => now - *at <= CLAIMED_TTL,
            _ => true,
        });
        self.bytes -= freed;
    }
}

/// The packages this agent received, by container.
#[derive(Debug)]
pub struct Store {
    max_bytes: u64,
    inner: Mutex<Inner>,
    arrived: Notify,
}

impl Store {
    pub fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            inner: Mutex::default(),
            arrived: Notify::new(),
        }
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores a package of `bytes` (its encoded size). An unclaimed package for the same
    /// container is replaced (a newer export supersedes it); so is the memory of a claimed one.
    pub fn put(&self, package: Package, bytes: u64) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.prune(Instant::now());
        let c = package.container;
        let replaced = match inner.slots.get(&c) {
            Some(Slot::Claiming) => return Err(StoreError::BeingClaimed(c)),
            Some(Slot::Ready { bytes, .. }) => *bytes,
            _ => 0,
        };
        let stored = inner.bytes - replaced;
        if stored + bytes > self.max_bytes {
            return Err(StoreError::Full {
                bytes,
                stored,
                max: self.max_bytes,
            });
        }
        inner.bytes = stored + bytes;
        inner.slots.insert(
            c,
            Slot::Ready {
                package,
                bytes,
                since: Instant::now(),
            },
        );
        drop(inner);
        self.arrived.notify_waiters();
        Ok(())
    }

    /// Drops an unclaimed package (the source rolled its export back). True if there was one.
    pub fn withdraw(&self, container: Ipv4Addr) -> bool {
        let mut inner = self.lock();
        if let Some(Slot::Ready { bytes, .. }) = inner.slots.get(&container) {
            let b = *bytes;
            inner.slots.remove(&container);
            inner.bytes -= b;
            true
        } else {
            false
        }
    }

    /// Takes the package for `container`, waiting up to `timeout` for it to arrive.
    pub async fn take(&self, container: Ipv4Addr, timeout: Duration) -> Result<Taken, StoreError> {
        let t0 = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before looking, so an arrival in between is not missed.
            let notified = self.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut inner = self.lock();
                inner.prune(Instant::now());
                match inner.slots.remove(&container) {
                    Some(Slot::Ready { package, bytes, .. }) => {
                        inner.slots.insert(container, Slot::Claiming);
                        return Ok(Taken {
                            package,
                            bytes,
                            waited: t0.elapsed(),
                        });
                    }
                    Some(s @ Slot::Claiming) => {
                        inner.slots.insert(container, s);
                        return Err(StoreError::BeingClaimed(container));
                    }
                    Some(Slot::Claimed { at, sockets }) => {
                        inner.slots.insert(container, Slot::Claimed { at, sockets });
                        return Err(StoreError::AlreadyClaimed {
                            container,
                            ago_ms: at.elapsed().as_millis() as u64,
                            sockets,
                        });
                    }
                    None => {}
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(StoreError::NoPackage {
                    container,
                    waited_ms: t0.elapsed().as_millis() as u64,
                });
            }
        }
    }

    /// A claim failed before the process got the sockets: the package can be claimed again.
    pub fn put_back(&self, t: Taken) {
        let mut inner = self.lock();
        inner.slots.insert(
            t.package.container,
            Slot::Ready {
                package: t.package,
                bytes: t.bytes,
                since: Instant::now(),
            },
        );
        drop(inner);
        self.arrived.notify_waiters();
    }

    /// The process has the sockets: the package is gone for good.
    pub fn claimed(&self, t: Taken) {
        let mut inner = self.lock();
        inner.bytes -= t.bytes;
        inner.slots.insert(
            t.package.container,
            Slot::Claimed {
                at: Instant::now(),
                sockets: t.package.sockets.len(),
            },
        );
    }

    /// Bytes of packages waiting or being claimed.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }
}

/// serde helper: `Vec<u8>` as a standard base64 string.
mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn package(last: u8, state: &[u8]) -> Package {
        Package {
            container: Ipv4Addr::new(10, 244, 1, last),
            from: "a1".into(),
            sockets: Vec::new(),
            state: state.to_vec(),
        }
    }

    #[test]
    fn json_carries_the_state_as_base64() {
        let p = package(10, b"hello");
        let j = serde_json::to_string(&p).unwrap();
        assert!(j.contains(r#""state":"aGVsbG8=""#), "{j}");
        assert_eq!(serde_json::from_str::<Package>(&j).unwrap(), p);
    }

    #[tokio::test]
    async fn handed_out_once_bounded_and_waited_for() {
        let s = std::sync::Arc::new(Store::new(100));
        let c = Ipv4Addr::new(10, 244, 1, 10);
        // Nothing there: the claim waits, then says so.
        let e = s.take(c, Duration::from_millis(20)).await.unwrap_err();
        assert!(matches!(e, StoreError::NoPackage { .. }), "{e}");
        // A package arriving while a claim waits is handed to it.
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.take(c, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.put(package(10, b"x"), 60).unwrap();
        let t = waiter.await.unwrap().unwrap();
        assert_eq!(t.package.state, b"x");
        assert_eq!(s.bytes(), 60);
        // While claiming: a second claim and a new package are refused.
        assert!(matches!(
            s.take(c, Duration::ZERO).await,
            Err(StoreError::BeingClaimed(_))
        ));
        assert_eq!(
            s.put(package(10, b"y"), 1),
            Err(StoreError::BeingClaimed(c))
        );
        // A failed restore gives it back; a successful one settles it.
        s.put_back(t);
        let t = s.take(c, Duration::ZERO).await.unwrap();
        s.claimed(t);
        assert_eq!(s.bytes(), 0);
        let e = s.take(c, Duration::from_secs(1)).await.unwrap_err();
        assert!(e.to_string().contains("already claimed"), "{e}");
        // Bounded: 60 + 50 > 100.
        s.put(package(11, b""), 60).unwrap();
        assert!(matches!(
            s.put(package(12, b""), 50),
            Err(StoreError::Full { stored: 60, .. })
        ));
        // Replacing an unclaimed package frees the old one's bytes first.
        s.put(package(11, b""), 90).unwrap();
        assert!(s.withdraw(Ipv4Addr::new(10, 244, 1, 11)));
        assert_eq!(s.bytes(), 0);
    }
}
