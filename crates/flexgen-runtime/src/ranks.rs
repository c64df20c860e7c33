//! A pipeline over processes (ranks), one stage each, joined over TCP: rank 0 listens at the
//! coordinator address, owns the prompts, the embedding, the first stage, the LM head and
//! sampling; rank r > 0 runs stage r. The ranks form a ring, 0 → 1 → … → W−1 → 0: each group of
//! micro-batches goes round it once a step, its hidden states passed from stage to stage.
//!
//! Set-up: every rank r > 0 opens a listener, connects to the coordinator and says hello (its rank
//! and its listener's address); once all have, rank 0 tells each the address of its successor
//! (none for the last, whose successor is rank 0 over the coordinator connection). Rank r then
//! connects to its successor and takes its predecessor from its listener (rank 1's predecessor is
//! rank 0 over the coordinator connection).
//!
//! A rank that fails sends an error naming itself on round the ring, which every rank passes on
//! and stops at; rank 0 reports it. A rank that dies without a word closes its links: its
//! neighbours stop, and rank 0 reports the link that closed.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use flexgen_tensor::Tensor;

use crate::{Error, Result};

/// This process's place in a pipeline over processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankSpec {
    pub rank: u32,
    pub world_size: u32,
    /// `HOST:PORT` where rank 0 listens.
    pub coordinator: String,
}

/// How long rank 0 waits for every rank to join, and a rank for rank 0 to answer.
const JOIN_TIMEOUT: Duration = Duration::from_mins(2);

/// What goes round the ring.
#[derive(Debug)]
pub(crate) enum Msg {
    /// A new block: its micro-batches' (rows, prompt width) and longest context.
    Block { shapes: Vec<(usize, usize)>, max_len: usize },
    /// A group of micro-batches at one step.
    Group(Group),
    /// Rank `rank` failed.
    Failed { rank: u32, message: String },
    /// The run is over.
    Done,
}

/// A group of micro-batches on its way round the ring at step `step`: micro-batches
/// `first..first + hidden.len()`, `t` new positions after `past`, each row's padding `starts`.
#[derive(Debug)]
pub(crate) struct Group {
    pub g: usize,
    pub first: usize,
    pub t: usize,
    pub past: usize,
    pub starts: Vec<Vec<usize>>,
    pub hidden: Vec<Tensor>,
    /// The bytes the ranks after rank 0 moved between their tiers for this group (each adds its
    /// own), so that rank 0 reports the whole pipeline's traffic.
    pub traffic: crate::tiers::Traffic,
}

fn io(what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Config { field: "coordinator", message: format!("{what}: {e}") }
}

fn put_u64(w: &mut impl Write, v: usize) -> std::io::Result<()> {
    w.write_all(&(v as u64).to_le_bytes())
}

fn get_u64(r: &mut impl Read) -> std::io::Result<usize> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    usize::try_from(u64::from_le_bytes(b))
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "a count too large"))
}

/// A count read from a peer, bounded so that a damaged message cannot ask for any memory.
fn get_len(r: &mut impl Read, max: usize) -> std::io::Result<usize> {
    let n = get_u64(r)?;
    if n > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a length of {n} (at most {max}): not a flexgen rank on the other end"),
        ));
    }
    Ok(n)
}

fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    put_u64(w, s.len())?;
    w.write_all(s.as_bytes())
}

fn get_str(r: &mut impl Read) -> std::io::Result<String> {
    let n = get_len(r, 1 << 16)?;
    let mut b = vec![0u8; n];
    r.read_exact(&mut b)?;
    String::from_utf8(b).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

const MAX_ITEMS: usize = 1 << 24;

/// A hidden state's values as they cross a link between stages (f32; the TCP ring sends their
/// bytes in the host's order): what the ring and the in-process link carry.
pub(crate) fn hidden_values(x: &Tensor) -> std::io::Result<Vec<f32>> {
    x.flatten_all()
        .and_then(|f| f.to_vec1::<f32>())
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// The hidden state of shape `dims` made of `values` ([`hidden_values`] on the other side).
pub(crate) fn hidden_tensor(values: Vec<f32>, dims: &[usize]) -> std::io::Result<Tensor> {
    Tensor::from_vec(values, dims, &flexgen_tensor::Device::Cpu)
        .map_err(|e| std::io::Error::other(e.to_string()))
}

impl Msg {
    pub(crate) fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        match self {
            Msg::Block { shapes, max_len } => {
                w.write_all(&[1])?;
                put_u64(w, shapes.len())?;
                for &(rows, width) in shapes {
                    put_u64(w, rows)?;
                    put_u64(w, width)?;
                }
                put_u64(w, *max_len)?;
            }
            Msg::Group(g) => {
                w.write_all(&[2])?;
                for v in [g.g, g.first, g.t, g.past, g.hidden.len()] {
                    put_u64(w, v)?;
                }
                for (starts, x) in g.starts.iter().zip(&g.hidden) {
                    put_u64(w, starts.len())?;
                    for &s in starts {
                        put_u64(w, s)?;
                    }
                    let dims = x.dims();
                    put_u64(w, dims.len())?;
                    for &d in dims {
                        put_u64(w, d)?;
                    }
                    w.write_all(bytemuck::cast_slice(&hidden_values(x)?))?;
                }
                let t = &g.traffic;
                for v in [t.cpu_to_gpu, t.gpu_to_cpu, t.disk_read, t.disk_write] {
                    w.write_all(&v.to_le_bytes())?;
                }
            }
            Msg::Failed { rank, message } => {
                w.write_all(&[3])?;
                put_u64(w, *rank as usize)?;
                put_str(w, message)?;
            }
            Msg::Done => w.write_all(&[4])?,
        }
        w.flush()
    }

    pub(crate) fn read(r: &mut impl Read) -> std::io::Result<Self> {
        let mut kind = [0u8; 1];
        r.read_exact(&mut kind)?;
        Ok(match kind[0] {
            1 => {
                let n = get_len(r, MAX_ITEMS)?;
                let shapes = (0..n)
                    .map(|_| Ok((get_len(r, MAX_ITEMS)?, get_len(r, MAX_ITEMS)?)))
                    .collect::<std::io::Result<_>>()?;
                Msg::Block { shapes, max_len: get_len(r, MAX_ITEMS)? }
            }
            2 => {
                let (g, first) = (get_len(r, MAX_ITEMS)?, get_len(r, MAX_ITEMS)?);
                let (t, past) = (get_len(r, MAX_ITEMS)?, get_len(r, MAX_ITEMS)?);
                let n = get_len(r, MAX_ITEMS)?;
                let mut starts = Vec::with_capacity(n.min(1024));
                let mut hidden = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    let rows = get_len(r, MAX_ITEMS)?;
                    starts
                        .push((0..rows).map(|_| get_len(r, MAX_ITEMS)).collect::<Result<_, _>>()?);
                    let nd = get_len(r, 8)?;
                    let dims: Vec<usize> =
                        (0..nd).map(|_| get_len(r, MAX_ITEMS)).collect::<Result<_, _>>()?;
                    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                    let count = count.filter(|&c| c <= 1 << 32).ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, "a tensor too large")
                    })?;
                    let mut values = vec![0f32; count];
                    r.read_exact(bytemuck::cast_slice_mut(&mut values))?;
                    hidden.push(hidden_tensor(values, &dims)?);
                }
                let mut counts = [0u64; 4];
                for c in &mut counts {
                    let mut b = [0u8; 8];
                    r.read_exact(&mut b)?;
                    *c = u64::from_le_bytes(b);
                }
                let [cpu_to_gpu, gpu_to_cpu, disk_read, disk_write] = counts;
                let traffic =
                    crate::tiers::Traffic { cpu_to_gpu, gpu_to_cpu, disk_read, disk_write };
                Msg::Group(Group { g, first, t, past, starts, hidden, traffic })
            }
            3 => {
                let rank = u32::try_from(get_len(r, u32::MAX as usize)?).unwrap_or(u32::MAX);
                Msg::Failed { rank, message: get_str(r)? }
            }
            4 => Msg::Done,
            k => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("message kind {k}: not a flexgen rank on the other end"),
                ));
            }
        })
    }
}

/// One end of a ring link.
pub(crate) struct Wire {
    pub(crate) from_prev: Mutex<BufReader<TcpStream>>,
    pub(crate) to_next: Mutex<BufWriter<TcpStream>>,
    /// This rank and the pipeline's ranks, for messages.
    pub(crate) rank: u32,
    world: u32,
}

impl Wire {
    /// The pipeline's ranks.
    pub(crate) fn world(&self) -> usize {
        self.world as usize
    }

    /// Sends `m` to the next rank.
    pub(crate) fn send(&self, m: &Msg) -> Result<()> {
        let next = (self.rank + 1) % self.world;
        let mut w = self.to_next.lock().expect("one writer at a time");
        m.write(&mut *w).map_err(|e| Error::Rank {
            rank: next,
            message: format!("the link from rank {} closed ({e}): rank {next} stopped", self.rank),
        })
    }

    /// Receives the next message from the previous rank; a closed link is the previous rank's
    /// failure.
    pub(crate) fn recv(&self) -> Result<Msg> {
        let prev = (self.rank + self.world - 1) % self.world;
        let mut r = self.from_prev.lock().expect("one reader at a time");
        Msg::read(&mut *r).map_err(|e| Error::Rank {
            rank: prev,
            message: format!("its link to rank {} closed ({e}): rank {prev} stopped", self.rank),
        })
    }
}

/// Rank 0: listens at the coordinator address until every other rank has joined (or the time is
/// up: the missing ranks are named), then closes the ring.
pub(crate) fn coordinate(spec: &RankSpec) -> Result<Wire> {
    let world = spec.world_size;
    let listener = TcpListener::bind(&spec.coordinator)
        .map_err(io(&format!("listening at {}", spec.coordinator)))?;
    listener.set_nonblocking(true).map_err(io("listening"))?;
    let mut joined: Vec<Option<(TcpStream, String)>> = (0..world).map(|_| None).collect();
    let deadline = Instant::now() + JOIN_TIMEOUT;
    while joined.iter().skip(1).any(Option::is_none) {
        match listener.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false).map_err(io("a joining rank"))?;
                s.set_read_timeout(Some(JOIN_TIMEOUT)).map_err(io("a joining rank"))?;
                let (rank, addr) = (get_len(&mut s, u32::MAX as usize), get_str(&mut s));
                let (Ok(rank), Ok(addr)) = (rank, addr) else { continue };
                if rank == 0 || rank >= world as usize || joined[rank].is_some() {
                    continue; // not a rank of this run
                }
                s.set_read_timeout(None).map_err(io("a joining rank"))?;
                joined[rank] = Some((s, addr));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<String> = (1..world)
                        .filter(|&r| joined[r as usize].is_none())
                        .map(|r| r.to_string())
                        .collect();
                    return Err(Error::Config {
                        field: "coordinator",
                        message: format!(
                            "ranks {} did not join {} within {} s: start them with --rank R \
                             --world-size {world} --coordinator {}",
                            missing.join(", "),
                            spec.coordinator,
                            JOIN_TIMEOUT.as_secs(),
                            spec.coordinator
                        ),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io("accepting a rank")(e)),
        }
    }
    let addrs: Vec<String> =
        joined.iter().map(|j| j.as_ref().map_or_else(String::new, |(_, a)| a.clone())).collect();
    let mut streams: Vec<Option<TcpStream>> =
        joined.into_iter().map(|j| j.map(|(s, _)| s)).collect();
    for r in 1..world as usize {
        let next = if r + 1 < world as usize { addrs[r + 1].as_str() } else { "" };
        let s = streams[r].as_mut().expect("joined");
        put_str(s, next).map_err(io(&format!("telling rank {r} its successor")))?;
    }
    let first = streams[1].take().expect("joined");
    let last = if world == 2 {
        first.try_clone().map_err(io("the ring"))?
    } else {
        streams[world as usize - 1].take().expect("joined")
    };
    Ok(Wire {
        from_prev: Mutex::new(BufReader::new(last)),
        to_next: Mutex::new(BufWriter::new(first)),
        rank: 0,
        world,
    })
}

/// Rank r > 0: joins the coordinator and takes its place in the ring.
pub(crate) fn join(spec: &RankSpec) -> Result<Wire> {
    let (rank, world) = (spec.rank, spec.world_size);
    let addr: SocketAddr = spec
        .coordinator
        .to_socket_addrs()
        .map_err(io(&format!("resolving {}", spec.coordinator)))?
        .next()
        .ok_or_else(|| io("resolving")(std::io::Error::other(spec.coordinator.clone())))?;
    // Rank 0 may not listen yet: retry until it does.
    let deadline = Instant::now() + JOIN_TIMEOUT;
    let mut coord = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("rank {rank}: the coordinator is not up yet ({e})");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(io(&format!("joining the coordinator {addr}"))(e)),
        }
    };
    // This rank's listener, on the interface that reaches the coordinator.
    let here = coord.local_addr().map_err(io("the coordinator link"))?.ip();
    let listener = TcpListener::bind((here, 0)).map_err(io("listening for the previous rank"))?;
    let mine = listener.local_addr().map_err(io("listening"))?.to_string();
    put_u64(&mut coord, rank as usize).map_err(io("saying hello"))?;
    put_str(&mut coord, &mine).map_err(io("saying hello"))?;
    coord.flush().map_err(io("saying hello"))?;
    let next = get_str(&mut coord).map_err(io("waiting for the coordinator"))?;
    let to_next = if next.is_empty() {
        coord.try_clone().map_err(io("the ring"))?
    } else {
        TcpStream::connect(&next).map_err(io(&format!("connecting to rank {}", rank + 1)))?
    };
    let from_prev = if rank == 1 {
        coord
    } else {
        listener.accept().map_err(io(&format!("waiting for rank {}", rank - 1)))?.0
    };
    Ok(Wire {
        from_prev: Mutex::new(BufReader::new(from_prev)),
        to_next: Mutex::new(BufWriter::new(to_next)),
        rank,
        world,
    })
}
