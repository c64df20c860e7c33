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

use crate::stage::{BlockInput, Feed, Picks};
use crate::{Error, Result};

/// This process's place in a pipeline over processes.
#[derive(Debug, Clone)]
pub struct RankSpec {
    pub rank: u32,
    pub world_size: u32,
    /// `HOST:PORT` where rank 0 listens.
    pub coordinator: String,
    /// How CUDA ranks pass hidden states (rank 0's choice holds for all).
    pub link: RankLink,
    /// Rank 0: a listener already bound at `coordinator` (a launcher that binds first and then
    /// starts the ranks leaves no moment in which another process can take the port); `None`:
    /// rank 0 binds it.
    pub bound: Option<std::sync::Arc<TcpListener>>,
}

/// How CUDA ranks pass hidden states from one rank's GPU to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RankLink {
    /// NCCL where every rank has a GPU of its own (rank 0 counts the GPUs of its host), NCCL
    /// loads and every stage keeps its activations on the GPU; the ring otherwise.
    #[default]
    Auto,
    /// Through host memory over the TCP ring (any placement; ranks may share a GPU).
    Tcp,
    /// NCCL send/recv between the GPUs (one GPU per rank; activations on the GPU).
    Nccl,
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
    /// CUDA ranks, rank 0 to the others once all have joined: the requests the stages are sized
    /// for, and the NCCL links' ids (link r joins rank r to r + 1; none: hidden states cross
    /// through host memory over the ring).
    Setup { max_prompt: usize, max_new: usize, links: Vec<[u8; 128]> },
    /// CUDA ranks: every rank has built its stage (goes round once after `Setup`).
    Ready,
    /// CUDA ranks: a block, from rank 0 on down the ranks.
    Input(BlockInput),
    /// CUDA ranks: a group's hidden states at a step, GPU batches `first..`, one's fp16 bytes
    /// each.
    Hidden { first: usize, parts: Vec<Vec<u8>> },
    /// CUDA ranks: a group's hidden states follow over the NCCL link, GPU batches
    /// `first..first + count`, `bytes` each.
    Sent { first: usize, count: usize, bytes: usize },
    /// CUDA ranks: the last rank's picks of a group at a step (micro-batches `first..`), to rank 0.
    Picks { first: usize, picks: Vec<Picks> },
    /// CUDA ranks: rank 0's answer after a step, on down the ranks.
    Feed(Feed),
    /// CUDA ranks: the bytes ranks 1 … r moved for a block, from rank r to r + 1 (the last rank
    /// to rank 0) once the block is done: after everything else r sends for the block (rank 0
    /// sends none moved).
    Traffic(crate::tiers::Traffic),
    /// CUDA ranks, at the end of a `generate` call: rank 0's request (empty) goes down the
    /// ranks, each adds its own, and the last sends the list back to rank 0, which reports the
    /// whole pipeline's memory.
    Usage(Vec<RankUsage>),
}

/// What a CUDA rank holds at the end of a `generate` call: on its GPU (`gpu`, the ordinal: ranks
/// that share a GPU read the same device's use), in its process's host memory and on disk, and
/// the bytes it moved outside the blocks (the cache's disk reads and writes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RankUsage {
    pub gpu: usize,
    pub required: crate::tiers::TierBytes,
    pub traffic: crate::tiers::Traffic,
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

fn put_u32s(w: &mut impl Write, v: &[u32]) -> std::io::Result<()> {
    put_u64(w, v.len())?;
    w.write_all(bytemuck::cast_slice(v))
}

fn get_u32s(r: &mut impl Read) -> std::io::Result<Vec<u32>> {
    let mut v = vec![0u32; get_len(r, MAX_ITEMS)?];
    r.read_exact(bytemuck::cast_slice_mut(&mut v))?;
    Ok(v)
}

/// A one-byte flag (0: off).
fn get_flag(r: &mut impl Read) -> std::io::Result<bool> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0] != 0)
}

/// Byte counts, unbounded (unlike `put_u64`'s lengths).
fn put_counts(w: &mut impl Write, counts: &[u64]) -> std::io::Result<()> {
    counts.iter().try_for_each(|v| w.write_all(&v.to_le_bytes()))
}

fn get_counts<const N: usize>(r: &mut impl Read) -> std::io::Result<[u64; N]> {
    let mut counts = [0u64; N];
    for c in &mut counts {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        *c = u64::from_le_bytes(b);
    }
    Ok(counts)
}

fn put_traffic(w: &mut impl Write, t: &crate::tiers::Traffic) -> std::io::Result<()> {
    put_counts(w, &[t.cpu_to_gpu, t.gpu_to_cpu, t.disk_read, t.disk_write])
}

fn get_traffic(r: &mut impl Read) -> std::io::Result<crate::tiers::Traffic> {
    let [cpu_to_gpu, gpu_to_cpu, disk_read, disk_write] = get_counts(r)?;
    Ok(crate::tiers::Traffic { cpu_to_gpu, gpu_to_cpu, disk_read, disk_write })
}

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
    /// What it is, for messages.
    fn what(&self) -> &'static str {
        match self {
            Msg::Block { .. } => "a block",
            Msg::Group(_) => "a group",
            Msg::Failed { .. } => "a failure",
            Msg::Done => "the end",
            Msg::Setup { .. } => "a CUDA rank's set-up",
            Msg::Ready => "a CUDA rank's readiness",
            Msg::Input(_) => "a CUDA block",
            Msg::Hidden { .. } | Msg::Sent { .. } => "a CUDA hidden state",
            Msg::Picks { .. } => "a CUDA step's picks",
            Msg::Feed(_) => "a CUDA step's feed",
            Msg::Traffic(_) => "a CUDA block's traffic",
            Msg::Usage(_) => "the CUDA ranks' memory",
        }
    }

    /// The error for this message where another was due: the ranks run different programs or
    /// devices.
    pub(crate) fn unexpected(&self) -> Error {
        Error::Config {
            field: "coordinator",
            message: format!(
                "an unexpected message from the ring ({}): the ranks are not the same flexgen, or \
                 not on the same --device (give every rank the same command line)",
                self.what()
            ),
        }
    }

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
                put_traffic(w, &g.traffic)?;
            }
            Msg::Failed { rank, message } => {
                w.write_all(&[3])?;
                put_u64(w, *rank as usize)?;
                put_str(w, message)?;
            }
            Msg::Done => w.write_all(&[4])?,
            Msg::Setup { max_prompt, max_new, links } => {
                w.write_all(&[5])?;
                put_u64(w, *max_prompt)?;
                put_u64(w, *max_new)?;
                put_u64(w, links.len())?;
                for id in links {
                    w.write_all(id)?;
                }
            }
            Msg::Ready => w.write_all(&[6])?,
            Msg::Input(b) => {
                w.write_all(&[7])?;
                for v in [b.width, b.steps, b.pad as usize, b.ids.len()] {
                    put_u64(w, v)?;
                }
                for ((ids, starts), want) in b.ids.iter().zip(&b.starts).zip(&b.want_logits) {
                    put_u32s(w, ids)?;
                    put_u64(w, starts.len())?;
                    for (&s, &l) in starts.iter().zip(want) {
                        put_u64(w, s)?;
                        w.write_all(&[u8::from(l)])?;
                    }
                }
            }
            Msg::Hidden { first, parts } => {
                w.write_all(&[8])?;
                put_u64(w, *first)?;
                put_u64(w, parts.len())?;
                for p in parts {
                    put_u64(w, p.len())?;
                    w.write_all(p)?;
                }
            }
            Msg::Sent { first, count, bytes } => {
                w.write_all(&[12])?;
                put_u64(w, *first)?;
                put_u64(w, *count)?;
                put_u64(w, *bytes)?;
            }
            Msg::Picks { first, picks } => {
                w.write_all(&[9])?;
                put_u64(w, *first)?;
                put_u64(w, picks.len())?;
                for p in picks {
                    put_u32s(w, &p.greedy)?;
                    put_u64(w, p.logits.len())?;
                    for l in &p.logits {
                        match l {
                            None => w.write_all(&[0])?,
                            Some(v) => {
                                w.write_all(&[1])?;
                                put_u64(w, v.len())?;
                                w.write_all(bytemuck::cast_slice(v))?;
                            }
                        }
                    }
                }
            }
            Msg::Feed(feed) => {
                w.write_all(&[10])?;
                match feed {
                    None => w.write_all(&[0])?,
                    Some(rows) => {
                        w.write_all(&[1])?;
                        put_u64(w, rows.len())?;
                        for r in rows {
                            put_u32s(w, r)?;
                        }
                    }
                }
            }
            Msg::Traffic(t) => {
                w.write_all(&[11])?;
                put_traffic(w, t)?;
            }
            Msg::Usage(ranks) => {
                w.write_all(&[13])?;
                put_u64(w, ranks.len())?;
                for u in ranks {
                    put_u64(w, u.gpu)?;
                    put_counts(w, &[u.required.gpu, u.required.cpu, u.required.disk])?;
                    put_traffic(w, &u.traffic)?;
                }
            }
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
                Msg::Group(Group { g, first, t, past, starts, hidden, traffic: get_traffic(r)? })
            }
            3 => {
                let rank = u32::try_from(get_len(r, u32::MAX as usize)?).unwrap_or(u32::MAX);
                Msg::Failed { rank, message: get_str(r)? }
            }
            4 => Msg::Done,
            5 => {
                let (max_prompt, max_new) = (get_len(r, MAX_ITEMS)?, get_len(r, MAX_ITEMS)?);
                let n = get_len(r, 1024)?;
                let mut links = vec![[0u8; 128]; n];
                for id in &mut links {
                    r.read_exact(id)?;
                }
                Msg::Setup { max_prompt, max_new, links }
            }
            6 => Msg::Ready,
            7 => {
                let (width, steps) = (get_len(r, MAX_ITEMS)?, get_len(r, MAX_ITEMS)?);
                let pad = u32::try_from(get_len(r, u32::MAX as usize)?).unwrap_or(u32::MAX);
                let n = get_len(r, 1 << 16)?;
                let (mut ids, mut starts, mut want_logits) = (Vec::new(), Vec::new(), Vec::new());
                for _ in 0..n {
                    ids.push(get_u32s(r)?);
                    let rows = get_len(r, MAX_ITEMS)?;
                    let (mut st, mut want) = (Vec::new(), Vec::new());
                    for _ in 0..rows {
                        st.push(get_len(r, MAX_ITEMS)?);
                        want.push(get_flag(r)?);
                    }
                    starts.push(st);
                    want_logits.push(want);
                }
                Msg::Input(BlockInput { ids, starts, want_logits, width, steps, pad })
            }
            8 => {
                let first = get_len(r, 1 << 16)?;
                let n = get_len(r, 1 << 16)?;
                let mut parts = Vec::new();
                for _ in 0..n {
                    let mut p = vec![0u8; get_len(r, 1 << 36)?];
                    r.read_exact(&mut p)?;
                    parts.push(p);
                }
                Msg::Hidden { first, parts }
            }
            9 => {
                let first = get_len(r, 1 << 16)?;
                let n = get_len(r, 1 << 16)?;
                let mut picks = Vec::new();
                for _ in 0..n {
                    let greedy = get_u32s(r)?;
                    let rows = get_len(r, MAX_ITEMS)?;
                    let mut logits = Vec::new();
                    for _ in 0..rows {
                        logits.push(if get_flag(r)? {
                            let mut v = vec![0f32; get_len(r, 1 << 30)?];
                            r.read_exact(bytemuck::cast_slice_mut(&mut v))?;
                            Some(v)
                        } else {
                            None
                        });
                    }
                    picks.push(Picks { greedy, logits });
                }
                Msg::Picks { first, picks }
            }
            10 => Msg::Feed(if get_flag(r)? {
                let n = get_len(r, 1 << 16)?;
                Some((0..n).map(|_| get_u32s(r)).collect::<std::io::Result<_>>()?)
            } else {
                None
            }),
            11 => Msg::Traffic(get_traffic(r)?),
            12 => {
                let (first, count) = (get_len(r, 1 << 16)?, get_len(r, 1 << 16)?);
                Msg::Sent { first, count, bytes: get_len(r, 1 << 36)? }
            }
            13 => {
                let n = get_len(r, 1 << 16)?;
                let mut ranks = Vec::with_capacity(n);
                for _ in 0..n {
                    let gpu = get_len(r, 1 << 16)?;
                    let [g, c, d] = get_counts(r)?;
                    let required = crate::tiers::TierBytes { gpu: g, cpu: c, disk: d };
                    ranks.push(RankUsage { gpu, required, traffic: get_traffic(r)? });
                }
                Msg::Usage(ranks)
            }
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

    /// Sends this rank's failure `e` round the ring (the next rank may have stopped: then the
    /// send is lost) and returns it.
    pub(crate) fn fail(&self, e: Error) -> Error {
        let _ = self.send(&Msg::Failed { rank: self.rank, message: e.to_string() });
        e
    }

    /// The error for `m` where another message was due: a failure that came round (passed on,
    /// as every rank passes it on and stops), or the wrong message.
    pub(crate) fn not_due(&self, m: Msg) -> Error {
        match m {
            Msg::Failed { rank, message } => {
                let _ = self.send(&Msg::Failed { rank, message: message.clone() });
                Error::Rank { rank, message }
            }
            other => other.unexpected(),
        }
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
    let listener = match &spec.bound {
        Some(l) => l.try_clone(),
        None => TcpListener::bind(&spec.coordinator),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(m: &Msg) -> Vec<u8> {
        let mut v = Vec::new();
        m.write(&mut v).unwrap();
        v
    }

    /// Every CUDA rank's message reads back as written, and a cut one is an error.
    #[test]
    fn cuda_rank_messages_read_back() {
        let block = BlockInput {
            ids: vec![vec![1, 2, 3, 4], vec![5, 6]],
            starts: vec![vec![0, 1], vec![0]],
            want_logits: vec![vec![true, false], vec![false]],
            width: 2,
            steps: 7,
            pad: 9,
        };
        let picks = vec![
            Picks { greedy: vec![3, 4], logits: vec![Some(vec![0.5, -1.0]), None] },
            Picks { greedy: vec![8], logits: vec![None] },
        ];
        let traffic =
            crate::tiers::Traffic { cpu_to_gpu: 1, gpu_to_cpu: 2, disk_read: 3, disk_write: 4 };
        let msgs = [
            Msg::Setup { max_prompt: 512, max_new: 32, links: vec![[7u8; 128], [1u8; 128]] },
            Msg::Ready,
            Msg::Input(block),
            Msg::Hidden { first: 2, parts: vec![vec![1, 2, 3], vec![4, 5, 6]] },
            Msg::Sent { first: 1, count: 3, bytes: 4096 },
            Msg::Picks { first: 4, picks },
            Msg::Feed(Some(vec![vec![1, 2], vec![3]])),
            Msg::Feed(None),
            Msg::Traffic(traffic),
            Msg::Usage(Vec::new()),
            Msg::Usage(vec![
                RankUsage {
                    gpu: 1,
                    required: crate::tiers::TierBytes { gpu: 5, cpu: 6, disk: 7 },
                    traffic,
                },
                RankUsage::default(),
            ]),
        ];
        for m in &msgs {
            let b = bytes(m);
            let back = Msg::read(&mut b.as_slice()).unwrap();
            assert_eq!(bytes(&back), b, "{}", m.what());
            assert_eq!(format!("{back:?}"), format!("{m:?}"));
            assert!(Msg::read(&mut &b[..b.len() - 1]).is_err(), "{} cut short", m.what());
        }
    }
}
