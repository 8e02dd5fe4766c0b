//! The pure part of a commit cycle: decode a batch of input records, fold it over the loaded
//! books with the ledger, and describe everything the cycle must write as one [`Commit`].
//!
//! No Kafka, no RocksDB, no clock: the records (in merged order, see [`super::merge`]), the
//! books, the wall clock and the partitions' stream times ([`StreamTimes`]) come in, the commit
//! goes out. Each input is applied at its place on its partition's stream time; the
//! time-driven rules of every touched customer run at the stream time the batch ends on. The
//! loop around it ([`super`]) polls, loads, transacts and writes; the criterion benchmark
//! `benches/fold.rs` runs decode -> fold -> encode -> state writes without I/O.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use super::stream_time::{Placed, StreamTimes};
use crate::codec::{self, CodecError};
use crate::config::{Config, OutputFormat};
use crate::kafka::{partition_for, InputTopic, OutputTopic};
use crate::ledger::{Applied, Book, CustomerId, Input, Ledger, MeterName, Output, Refs};
use crate::store::layout::{DeltaKey, Layout, StateBatch};
use crate::store::{BookRequest, Due, StateWrite};

/// An input record (borrowed: from librdkafka's buffer in the pipeline, from anywhere in tests
/// and benchmarks).
#[derive(Clone, Copy, Debug)]
pub struct InputRecord<'a> {
    /// The topic it came from.
    pub topic: InputTopic,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its timestamp (ms), if the producer or broker set one.
    pub timestamp: Option<i64>,
    /// Its key.
    pub key: Option<&'a [u8]>,
    /// Its payload.
    pub payload: Option<&'a [u8]>,
    /// Its `content-type` header, if any (the only header the fold reads, and the one the DLQ
    /// keeps).
    pub content_type: Option<&'a str>,
}

/// One record to produce in the transaction (keyed by customer, partitioned by murmur2 of the
/// key); the changelog records are the commit's [`StateWrite`]s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutRecord {
    /// Where to.
    pub topic: OutputTopic,
    /// The key.
    pub key: Vec<u8>,
    /// The payload.
    pub payload: Option<Vec<u8>>,
    /// The headers (most values are constant labels, borrowed rather than copied per record).
    pub headers: Vec<(&'static str, Cow<'static, [u8]>)>,
}

/// The most payload bytes a DLQ record copies from its input.
pub const MAX_DLQ_PAYLOAD: usize = 512 << 10;

/// What became of an input record, per topic (the `drawdown_records_*_total` counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Read.
    Consumed,
    /// Changed the state.
    Applied,
    /// Seen before.
    Duplicate,
}

/// The counts of one commit, published as metrics once it is committed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Records per (topic, outcome).
    pub records: BTreeMap<(InputTopic, Outcome), u64>,
    /// Usage events no meter counts.
    pub unmetered: u64,
    /// Records outside murmur2(customer_id)'s partition.
    pub misrouted: u64,
    /// Records later than the grace, applied at stream time.
    pub late: u64,
    /// Rejected records per (reason, stage).
    pub rejected: BTreeMap<(&'static str, &'static str), u64>,
    /// Transitions per kind label.
    pub transitions: BTreeMap<&'static str, u64>,
    /// Automatic top-up requests per source label.
    pub top_ups: BTreeMap<&'static str, u64>,
    /// Records produced per output topic (changelog included).
    pub produced: BTreeMap<OutputTopic, u64>,
}

impl Counts {
    fn record(&mut self, topic: InputTopic, outcome: Outcome) {
        *self.records.entry((topic, outcome)).or_default() += 1;
    }

    /// Adds these counts to the metrics.
    pub fn publish(&self) {
        use crate::metrics as m;
        for ((topic, outcome), n) in &self.records {
            let name = match outcome {
                Outcome::Consumed => m::RECORDS_CONSUMED,
                Outcome::Applied => m::RECORDS_APPLIED,
                Outcome::Duplicate => m::RECORDS_DUPLICATE,
            };
            metrics::counter!(name, "topic" => topic.label()).increment(*n);
        }
        metrics::counter!(m::RECORDS_UNMETERED).increment(self.unmetered);
        metrics::counter!(m::RECORDS_MISROUTED).increment(self.misrouted);
        metrics::counter!(m::RECORDS_LATE).increment(self.late);
        for ((reason, stage), n) in &self.rejected {
            metrics::counter!(m::RECORDS_REJECTED, "reason" => *reason, "stage" => *stage)
                .increment(*n);
        }
        for (kind, n) in &self.transitions {
            metrics::counter!(m::TRANSITIONS, "kind" => *kind).increment(*n);
        }
        for (source, n) in &self.top_ups {
            metrics::counter!(m::TOP_UP_REQUESTS, "source" => *source).increment(*n);
        }
        for (topic, n) in &self.produced {
            metrics::counter!(m::OUTPUTS_PRODUCED, "topic" => topic.label()).increment(*n);
        }
    }
}

/// Everything one commit cycle writes, built without I/O.
#[derive(Debug, Default)]
pub struct Commit {
    /// The output records (balance changes, transitions, top-ups, DLQ), encoded once.
    pub outputs: Vec<OutRecord>,
    /// The state changes: produced to the changelog and/or written to the store after the
    /// commit (see [`StateWrite::target`]).
    pub state: Vec<StateWrite>,
    /// The delta records written, so the loop can advance its sequence numbers.
    pub deltas: Vec<DeltaKey>,
    /// The folded books, for the cache once committed.
    pub books: Vec<(i32, Book)>,
    /// The next input offset per (topic, partition), committed with the transaction.
    pub offsets: BTreeMap<(InputTopic, i32), i64>,
    /// Per partition, the earliest due time this commit put into the due index.
    pub due_floor: BTreeMap<i32, i64>,
    /// What happened, for the metrics.
    pub counts: Counts,
}

/// The inputs of one customer of one partition, in record order.
#[derive(Debug)]
struct Group {
    partition: i32,
    customer: CustomerId,
    refs: Refs,
    /// (index of the record in the batch, decoded input, its place on the stream time).
    inputs: Vec<(usize, Input, Placed)>,
    /// Whether a tick found one of its meters due.
    ticked: bool,
}

/// A decoded batch, grouped by (partition, customer) in order of first appearance.
#[derive(Debug, Default)]
pub struct Decoded {
    groups: Vec<Group>,
    index: HashMap<(i32, CustomerId), usize>,
    /// (index of the record, why it could not be decoded).
    rejected: Vec<(usize, CodecError)>,
    offsets: BTreeMap<(InputTopic, i32), i64>,
    counts: Counts,
    /// The due-index keys the ticks read.
    due_read: Vec<Due>,
}

impl Decoded {
    fn group(&mut self, partition: i32, customer: &CustomerId) -> &mut Group {
        let groups = &mut self.groups;
        let i = *self
            .index
            .entry((partition, customer.clone()))
            .or_insert_with(|| {
                groups.push(Group {
                    partition,
                    customer: customer.clone(),
                    refs: Refs::default(),
                    inputs: Vec::new(),
                    ticked: false,
                });
                groups.len() - 1
            });
        &mut self.groups[i]
    }

    /// Adds the customer of a meter found due (a tick), with no input of its own. The fold
    /// deletes the due-index key read and puts back the customer's current due times.
    pub fn tick(&mut self, due: Due) {
        self.group(due.partition, &due.customer).ticked = true;
        self.due_read.push(due);
    }

    /// The books to load for [`Folder::fold`], in the order it expects them.
    pub fn requests(&self) -> Vec<BookRequest<'_>> {
        self.groups
            .iter()
            .map(|g| BookRequest {
                partition: g.partition,
                customer: &g.customer,
                refs: &g.refs,
            })
            .collect()
    }
}

/// When meter `m` of `book` next has a time-driven change, if it has one.
fn due_of(book: &Book, m: &MeterName) -> Option<i64> {
    book.meters.get(m).and_then(|s| s.next_due())
}

/// Decodes and folds batches: the ledger with the settings of the outputs.
#[derive(Clone, Debug)]
pub struct Folder {
    ledger: Ledger,
    meters: Vec<MeterName>,
    partitions: i32,
    format: OutputFormat,
    layout: Layout,
    /// Input topic names, for the DLQ's `source.topic` header.
    usage_topic: String,
    grants_topic: String,
}

impl Folder {
    /// A folder for `cfg`'s outputs over topics of `partitions` partitions.
    pub fn new(ledger: Ledger, cfg: &Config, partitions: i32) -> Self {
        let meters = ledger
            .meters()
            .all()
            .iter()
            .map(|d| d.name.clone())
            .collect();
        Self {
            ledger,
            meters,
            partitions,
            format: cfg.pipeline.output_format,
            layout: Layout::from_config(&cfg.pipeline),
            usage_topic: cfg.topics.usage.clone(),
            grants_topic: cfg.topics.grants.clone(),
        }
    }

    /// The partition count of the (co-partitioned) topics, as found at start-up.
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// The configured meters' names.
    pub fn meters(&self) -> &[MeterName] {
        &self.meters
    }

    /// How the state is cut into records.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Decodes `records` (in merged order) and groups them by (partition, customer), keeping
    /// their order; places each on its partition's stream time in `times` (`wall`: the clock,
    /// for the future-skew check and records without a timestamp).
    pub fn decode(
        &self,
        records: &[InputRecord<'_>],
        times: &mut StreamTimes,
        wall: i64,
    ) -> Decoded {
        let mut d = Decoded::default();
        for (i, r) in records.iter().enumerate() {
            d.offsets.insert((r.topic, r.partition), r.offset + 1);
            d.counts.record(r.topic, Outcome::Consumed);
            let (payload, ct, key) = (r.payload, r.content_type, r.key);
            let decoded = match r.topic {
                InputTopic::Usage => codec::decode_usage(payload, ct, key),
                InputTopic::Grants => codec::decode_command(payload, ct, key),
            };
            let placed = decoded
                .and_then(|input| self.route(r, input, &mut d.counts))
                .and_then(|input| {
                    let t = input.event_time().or(r.timestamp).unwrap_or(wall);
                    match times.place(r.partition, t, wall) {
                        Ok(placed) => Ok((input, placed)),
                        Err(f) => Err(CodecError::TimestampInFuture {
                            at: t,
                            limit: f.limit,
                        }),
                    }
                });
            match placed {
                Ok((input, placed)) => {
                    let customer = input.customer().clone();
                    let g = d.group(r.partition, &customer);
                    input.refs(&mut g.refs);
                    g.inputs.push((i, input, placed));
                }
                Err(e) => d.rejected.push((i, e)),
            }
        }
        d
    }

    /// `input` if `r` is keyed and in the partition murmur2 of its customer gives; a record
    /// elsewhere is never applied (its customer's book, dedupe and history live in that one
    /// partition), but dead-lettered as `misrouted`.
    fn route(
        &self,
        r: &InputRecord<'_>,
        input: Input,
        counts: &mut Counts,
    ) -> Result<Input, CodecError> {
        let customer = input.customer().as_str();
        let expected = partition_for(customer.as_bytes(), self.partitions);
        let why = match r.key {
            None | Some([]) => format!(
                "record has no key; key it by customer_id {customer:?} \
                 (partition {expected} by murmur2)"
            ),
            Some(_) if expected != r.partition => format!(
                "customer_id {customer:?} belongs in partition {expected} (murmur2 of the key), \
                 the record is in partition {}",
                r.partition
            ),
            Some(_) => return Ok(input),
        };
        counts.misrouted += 1;
        Err(CodecError::Misrouted(why))
    }

    /// Folds a decoded batch of `records` over `books` (loaded for [`Decoded::requests`], in
    /// that order): each input at its place, then every touched customer's time-driven rules at
    /// its partition's stream time in `times` (as [`Folder::decode`] left them). Delta records
    /// are numbered from `next_seq` (per partition) and carry the stream times.
    pub fn fold(
        &self,
        records: &[InputRecord<'_>],
        decoded: Decoded,
        books: Vec<Book>,
        next_seq: &BTreeMap<i32, u64>,
        times: &StreamTimes,
    ) -> Commit {
        let Decoded {
            groups,
            rejected,
            offsets,
            mut counts,
            due_read,
            ..
        } = decoded;
        assert_eq!(groups.len(), books.len(), "a book per group");
        let mut c = Commit {
            outputs: Vec::with_capacity(records.len() * 2),
            offsets,
            books: Vec::with_capacity(books.len()),
            ..Default::default()
        };
        let mut state = StateBatch::with_capacity(self.layout, records.len() * 3);
        for d in &due_read {
            state.forget_due(d);
        }
        for (i, e) in rejected {
            c.outputs
                .push(self.dead_letter(&records[i], "decode", &e, &mut counts));
        }
        let mut results: Vec<Output> = Vec::new();
        // Each configured meter's due time before the group's inputs (one buffer for the batch).
        let mut was: Vec<Option<i64>> = Vec::with_capacity(self.meters.len());
        for (g, mut book) in groups.into_iter().zip(books) {
            debug_assert_eq!(book.customer, g.customer);
            let p = g.partition;
            was.clear();
            was.extend(self.meters.iter().map(|m| due_of(&book, m)));
            for (i, input, placed) in &g.inputs {
                let r = &records[*i];
                if placed.late {
                    counts.late += 1;
                }
                // Applying advances the input's meter to `placed.at` first.
                let first = results.len();
                let applied = self.ledger.apply(&mut book, input, placed.at, &mut results);
                if placed.late {
                    for out in &mut results[first..] {
                        if let Output::Changed(ch) = out {
                            ch.late = true;
                        }
                    }
                }
                match applied {
                    Ok(Applied::Applied) => counts.record(r.topic, Outcome::Applied),
                    Ok(Applied::Duplicate) => counts.record(r.topic, Outcome::Duplicate),
                    Ok(Applied::NoMeter) => counts.unmetered += 1,
                    Err(e) => {
                        let e = CodecError::Invalid(e);
                        c.outputs
                            .push(self.dead_letter(r, "apply", &e, &mut counts));
                    }
                }
            }
            // Then what expired or became active by the stream time, on every meter.
            self.ledger.advance(&mut book, times.get(p), &mut results);
            for out in results.drain(..) {
                c.outputs
                    .push(self.output(p, &book.customer, out, &mut state, &mut counts));
            }
            // The due index follows the configured meters whose due time moved; a tick puts
            // back every current one (it deleted the key it read, which may be stale).
            for (m, &was) in self.meters.iter().zip(&was) {
                let now = due_of(&book, m);
                if was != now || g.ticked {
                    state.due(p, &book.customer, m, was.filter(|_| was != now), now);
                    if let Some(at) = now {
                        let floor = c.due_floor.entry(p).or_insert(at);
                        *floor = (*floor).min(at);
                    }
                }
            }
            let dirty = book.take_dirty();
            state.book(p, &book, &dirty);
            c.books.push((p, book));
        }
        (c.state, c.deltas) = state.finish(next_seq, times.all());
        for o in &c.outputs {
            *counts.produced.entry(o.topic).or_default() += 1;
        }
        *counts.produced.entry(OutputTopic::Changelog).or_default() +=
            c.state.iter().filter(|w| w.target.changelog()).count() as u64;
        c.counts = counts;
        c
    }

    /// Encodes one output of the rules (and keeps a balance change in the history).
    fn output(
        &self,
        p: i32,
        customer: &CustomerId,
        out: Output,
        state: &mut StateBatch,
        counts: &mut Counts,
    ) -> OutRecord {
        let format = self.format;
        let key = customer.as_str().as_bytes().to_vec();
        let content_type = (
            "content-type",
            Cow::Borrowed(codec::content_type(format).as_bytes()),
        );
        match out {
            Output::Changed(ch) => {
                state.change(p, &ch);
                OutRecord {
                    topic: OutputTopic::BalanceChanged,
                    key,
                    payload: Some(codec::encode_changed(&ch, format)),
                    headers: vec![content_type],
                }
            }
            Output::Transition(t) => {
                let label = codec::transition_label(t.kind);
                *counts.transitions.entry(label).or_default() += 1;
                OutRecord {
                    topic: OutputTopic::BalanceExhausted,
                    key,
                    payload: Some(codec::encode_transition(&t, format)),
                    headers: vec![content_type, ("type", Cow::Borrowed(label.as_bytes()))],
                }
            }
            Output::TopUp(t) => {
                *counts
                    .top_ups
                    .entry(codec::top_up_source_label(t.source))
                    .or_default() += 1;
                OutRecord {
                    topic: OutputTopic::TopUpRequests,
                    key,
                    payload: Some(codec::encode_top_up(&t, format)),
                    headers: codec::top_up_headers(&t, format)
                        .into_iter()
                        .map(|(k, v)| (k, Cow::Owned(v.into_bytes())))
                        .collect(),
                }
            }
        }
    }

    /// The DLQ record of a rejected input: the original bytes, with the reason and the source.
    fn dead_letter(
        &self,
        r: &InputRecord<'_>,
        stage: &'static str,
        e: &CodecError,
        counts: &mut Counts,
    ) -> OutRecord {
        let reason = e.reason();
        *counts.rejected.entry((reason, stage)).or_default() += 1;
        let message = e.to_string();
        tracing::debug!(
            partition = r.partition,
            offset = r.offset,
            reason,
            stage,
            message,
            "record rejected"
        );
        let source = match r.topic {
            InputTopic::Usage => &self.usage_topic,
            InputTopic::Grants => &self.grants_topic,
        };
        let owned = |v: String| Cow::Owned(v.into_bytes());
        let mut headers: Vec<(&'static str, Cow<'static, [u8]>)> = vec![
            ("error.reason", Cow::Borrowed(reason.as_bytes())),
            ("error.stage", Cow::Borrowed(stage.as_bytes())),
            ("error.message", owned(message)),
            ("source.topic", owned(source.clone())),
            ("source.partition", owned(r.partition.to_string())),
            ("source.offset", owned(r.offset.to_string())),
        ];
        if let Some(ct) = r.content_type {
            headers.push(("content-type", owned(ct.to_string())));
        }
        // A record near the broker's size limit does not fit again with the error headers:
        // the DLQ keeps its head and says so (the whole record stays in its source topic).
        let mut payload = r.payload.map(<[u8]>::to_vec);
        if let Some(p) = payload.as_mut().filter(|p| p.len() > MAX_DLQ_PAYLOAD) {
            headers.push(("payload.truncated-from", owned(p.len().to_string())));
            p.truncate(MAX_DLQ_PAYLOAD);
        }
        OutRecord {
            topic: OutputTopic::Dlq,
            key: r.key.map(<[u8]>::to_vec).unwrap_or_default(),
            payload,
            headers,
        }
    }
}

#[cfg(test)]
#[path = "fold_tests.rs"]
mod tests;
