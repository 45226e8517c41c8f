//! The RabbitMQ names of the external contract and their idempotent declaration.
//!
//! | name | kind |
//! | --- | --- |
//! | [`EXCHANGE`] `attune.executions` | durable topic exchange for requests, completions, cancels and dispatches |
//! | [`REQUESTS_QUEUE`], [`COMPLETED_QUEUE`], [`CANCEL_QUEUE`] | durable, bound to [`EXCHANGE`] by [`REQUESTED_ROUTING_KEY`], [`COMPLETED_ROUTING_KEY`], [`CANCEL_ROUTING_KEY`]; dead-letter to [`DLX`] as `dlq.requested`, `dlq.completed`, `dlq.cancel` |
//! | [`DLX`] `attune.dlx` | durable topic exchange for dead letters, routing key `dlq.<queue_from>` |
//! | [`DLQ`] `attune.dlq` | durable classic queue bound [`DLQ_BINDING_KEY`] with a TTL, a length limit and `drop-head` |
//!
//! RabbitMQ accepts a declaration of something that already exists only when it is declared the
//! same way. When it is not, the broker answers 406 PRECONDITION_FAILED and closes the channel;
//! [`declare`] turns that answer into a [`TopologyError::Inequivalent`] that says what differs and
//! how to fix it, because the usual cause is an operator change (`dlq.max_entries`,
//! `rabbitmq.queue_type`) that an existing queue cannot take on by itself.

use std::fmt;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ErrorKind, ExchangeKind};

/// Topic exchange on which requests, completions, cancels and dispatches are published.
pub const EXCHANGE: &str = "attune.executions";
/// Queue the executor consumes execution requests from.
pub const REQUESTS_QUEUE: &str = "attune.execution.requests.queue";
/// Queue the executor consumes worker completions from.
pub const COMPLETED_QUEUE: &str = "attune.execution.completed.queue";
/// Queue the executor consumes cancel requests from.
pub const CANCEL_QUEUE: &str = "attune.execution.cancel.queue";
/// Routing key producers publish requests with; binds [`REQUESTS_QUEUE`].
pub const REQUESTED_ROUTING_KEY: &str = "execution.requested";
/// Routing key workers publish completions with; binds [`COMPLETED_QUEUE`].
pub const COMPLETED_ROUTING_KEY: &str = "execution.completed";
/// Routing key for cancel requests; binds [`CANCEL_QUEUE`].
pub const CANCEL_ROUTING_KEY: &str = "execution.cancel";
/// Prefix of the dispatch routing key; the action ref follows (see [`dispatch_routing_key`]).
pub const DISPATCH_ROUTING_PREFIX: &str = "execution.dispatch.";
/// Topic exchange for dead letters.
pub const DLX: &str = "attune.dlx";
/// The dead-letter queue operators read.
pub const DLQ: &str = "attune.dlq";
/// Prefix of a dead letter's routing key; `queue_from` follows (see [`dlq_routing_key`]).
pub const DLQ_ROUTING_PREFIX: &str = "dlq.";
/// Binding of [`DLQ`] on [`DLX`]: every dead letter, whatever stage it came from.
pub const DLQ_BINDING_KEY: &str = "dlq.#";

/// The executor's input queues: name, the routing key that binds it to [`EXCHANGE`], and the
/// `queue_from` its broker-side dead letters are routed with.
const EXECUTOR_QUEUES: [(&str, &str, &str); 3] = [
    (REQUESTS_QUEUE, REQUESTED_ROUTING_KEY, "requested"),
    (COMPLETED_QUEUE, COMPLETED_ROUTING_KEY, "completed"),
    (CANCEL_QUEUE, CANCEL_ROUTING_KEY, "cancel"),
];

/// The largest `x-message-ttl` RabbitMQ 3.10 accepts (ten years; its `rabbit_misc:check_expiry`
/// answers `value_too_large` above it). Checked here so the error names the setting.
const MAX_MESSAGE_TTL_MS: u64 = 315_360_000_000;
const MS_PER_HOUR: u64 = 3_600_000;

/// The routing key a dispatch for `action_ref` is published with.
pub fn dispatch_routing_key(action_ref: &str) -> String {
    format!("{DISPATCH_ROUTING_PREFIX}{action_ref}")
}

/// The routing key a dead letter from stage `queue_from` (`requested`, `queued`, …) is published
/// with on [`DLX`].
pub fn dlq_routing_key(queue_from: &str) -> String {
    format!("{DLQ_ROUTING_PREFIX}{queue_from}")
}

/// Type of the executor's three input queues (`rabbitmq.queue_type`). Defined with the config so
/// that the config needs nothing from this edge.
pub use crate::config::QueueType as QueueKind;

/// The settings the topology depends on; everything else about it is fixed by the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopologySpec {
    /// Type of the three executor queues (`rabbitmq.queue_type`). The DLQ is always classic.
    pub queue_type: QueueKind,
    /// How long a dead letter stays in [`DLQ`] (`dlq.ttl_hours`); becomes `x-message-ttl`.
    pub dlq_ttl_hours: u64,
    /// How many dead letters [`DLQ`] keeps before dropping the oldest (`dlq.max_entries`);
    /// becomes `x-max-length`.
    pub dlq_max_entries: u64,
}

/// Something [`declare`] declares, named the way an operator would look for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entity {
    /// An exchange, by name.
    Exchange(&'static str),
    /// A queue, by name.
    Queue(&'static str),
    /// The binding of `queue` to `exchange` by `routing_key`.
    Binding {
        /// Bound queue.
        queue: &'static str,
        /// Exchange the queue is bound to.
        exchange: &'static str,
        /// Binding key.
        routing_key: &'static str,
    },
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entity::Exchange(name) => write!(f, "exchange '{name}'"),
            Entity::Queue(name) => write!(f, "queue '{name}'"),
            Entity::Binding {
                queue,
                exchange,
                routing_key,
            } => write!(
                f,
                "binding of queue '{queue}' to exchange '{exchange}' by '{routing_key}'"
            ),
        }
    }
}

/// Why [`declare`] failed.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// A setting cannot be expressed as the RabbitMQ argument it becomes; nothing was declared.
    #[error("{key} = {value} cannot be used: {reason}")]
    InvalidSpec {
        /// Config key of the setting.
        key: &'static str,
        /// The value given.
        value: u64,
        /// What would be accepted.
        reason: String,
    },

    /// The entity already exists on the broker with a different value for one argument.
    #[error("{0}")]
    Inequivalent(Box<Mismatch>),

    /// The broker refused the declaration as a precondition failure, in words [`declare`] does
    /// not recognise; its own text is kept whole.
    #[error(
        "RabbitMQ refused to declare {entity}: {broker_text}. If it already exists, compare its \
         settings with `rabbitmqctl list_queues name durable arguments` or `rabbitmqctl \
         list_exchanges name type durable`"
    )]
    Refused {
        /// What was being declared.
        entity: Entity,
        /// The broker's reply text.
        broker_text: String,
    },

    /// Any other failure: connection lost, access refused, channel already closed, …
    #[error("could not declare {entity}: {source}")]
    Amqp {
        /// What was being declared.
        entity: Entity,
        /// The client's error, boxed because it alone is larger than the rest of this enum.
        #[source]
        source: Box<lapin::Error>,
    },
}

/// An entity that exists with another value for one argument than the executor declares, and
/// how to resolve that. Boxed in [`TopologyError`] to keep its `Result`s small.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// What was being declared.
    pub entity: Entity,
    /// The differing argument, as the broker names it (`x-max-length`, `durable`, `type`).
    pub argument: String,
    /// The value the executor declared.
    pub wanted: String,
    /// The value the existing entity has (`not set` when it has none).
    pub current: String,
    /// How to resolve it, in a sentence or two.
    pub fix: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Mismatch {
            entity,
            argument,
            wanted,
            current,
            fix,
        } = self;
        write!(
            f,
            "{entity} already exists with {argument} = {current}, but the executor declares it \
             with {argument} = {wanted}. {fix}"
        )
    }
}

/// Declares the whole topology on `channel`, creating what is missing and checking that what
/// exists matches; declaring it again changes nothing.
///
/// Everything is declared on the one channel, in dependency order (exchanges, then the DLQ, then
/// the executor queues that dead-letter to it), and the first failure stops the declaration. The
/// broker closes a channel on which a declaration fails (404/406), so after an error the caller
/// must open a new channel before using the connection again.
pub async fn declare(channel: &Channel, spec: &TopologySpec) -> Result<(), TopologyError> {
    // Validate before touching the broker so a bad setting never leaves half a topology behind.
    let dlq_arguments = dlq_arguments(spec)?;

    declare_exchange(channel, EXCHANGE).await?;
    declare_exchange(channel, DLX).await?;

    declare_queue(channel, DLQ, dlq_arguments).await?;
    bind(channel, DLQ, DLX, DLQ_BINDING_KEY).await?;

    for (queue, routing_key, queue_from) in EXECUTOR_QUEUES {
        let arguments = executor_queue_arguments(spec.queue_type, queue_from);
        declare_queue(channel, queue, arguments).await?;
        bind(channel, queue, EXCHANGE, routing_key).await?;
    }
    Ok(())
}

/// Arguments of [`DLQ`].
///
/// The DLQ is a classic queue whatever `rabbitmq.queue_type` says. A queue's type can never be
/// changed in place, so tying the DLQ to that setting would force operators to drain and delete
/// a week of evidence to switch the executor queues' type. Replication buys little here: the DLQ
/// already drops its oldest entries by design. (A quorum queue would take the same arguments on
/// RabbitMQ 3.10, `drop-head` and message TTL included; this is a choice, not a limit.)
fn dlq_arguments(spec: &TopologySpec) -> Result<FieldTable, TopologyError> {
    let ttl_ms = spec
        .dlq_ttl_hours
        .checked_mul(MS_PER_HOUR)
        .filter(|ms| *ms <= MAX_MESSAGE_TTL_MS)
        .ok_or_else(|| TopologyError::InvalidSpec {
            key: "dlq.ttl_hours",
            value: spec.dlq_ttl_hours,
            reason: format!(
                "RabbitMQ's message TTL is at most {} hours",
                MAX_MESSAGE_TTL_MS / MS_PER_HOUR
            ),
        })?;
    let max_length =
        i64::try_from(spec.dlq_max_entries).map_err(|_| TopologyError::InvalidSpec {
            key: "dlq.max_entries",
            value: spec.dlq_max_entries,
            reason: format!("RabbitMQ's x-max-length is at most {}", i64::MAX),
        })?;

    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        long_string(QueueKind::Classic.as_str()),
    );
    // At most MAX_MESSAGE_TTL_MS (checked above), so it fits in i64.
    arguments.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(ttl_ms as i64),
    );
    arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(max_length));
    // drop-head keeps the newest failures, which are the ones an operator is investigating.
    arguments.insert("x-overflow".into(), long_string("drop-head"));
    Ok(arguments)
}

/// Arguments of one of the executor's input queues.
///
/// Beyond the contract's `x-dead-letter-exchange`, the queue also names a dead-letter routing
/// key: without one the broker keeps the original key (`execution.requested`), which does not
/// match the DLQ's `dlq.#` binding, so a message the broker itself dead-letters (rejected without
/// requeue) would be dropped instead of reaching `attune.dlq`.
///
/// Quorum queues get no `x-delivery-limit`: the executor counts deliveries itself and
/// dead-letters poison messages with its own envelope (error class `PoisonMessage`), which a
/// broker-side limit would pre-empt.
fn executor_queue_arguments(queue_type: QueueKind, queue_from: &str) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-dead-letter-exchange".into(), long_string(DLX));
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        long_string(&dlq_routing_key(queue_from)),
    );
    // Named even when classic, RabbitMQ's default: the broker treats an explicit `classic` as
    // equivalent to no type at all, and a mismatch then reads "quorum" against "classic".
    arguments.insert("x-queue-type".into(), long_string(queue_type.as_str()));
    arguments
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

async fn declare_exchange(channel: &Channel, name: &'static str) -> Result<(), TopologyError> {
    let options = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            options,
            FieldTable::default(),
        )
        .await
        .map_err(|error| classify(Entity::Exchange(name), error))
}

async fn declare_queue(
    channel: &Channel,
    name: &'static str,
    arguments: FieldTable,
) -> Result<(), TopologyError> {
    channel
        .queue_declare(name.into(), QueueDeclareOptions::durable(), arguments)
        .await
        .map(drop)
        .map_err(|error| classify(Entity::Queue(name), error))
}

async fn bind(
    channel: &Channel,
    queue: &'static str,
    exchange: &'static str,
    routing_key: &'static str,
) -> Result<(), TopologyError> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|error| {
            let entity = Entity::Binding {
                queue,
                exchange,
                routing_key,
            };
            classify(entity, error)
        })
}

/// Turns the broker's precondition failure into an explanation; passes anything else through.
fn classify(entity: Entity, error: lapin::Error) -> TopologyError {
    let ErrorKind::ProtocolError(amqp) = error.kind() else {
        return TopologyError::Amqp {
            entity,
            source: Box::new(error),
        };
    };
    if amqp.kind() != &AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) {
        return TopologyError::Amqp {
            entity,
            source: Box::new(error),
        };
    }
    let text = amqp.get_message().as_str();
    match parse_inequivalence(text) {
        Some(found) => {
            let fix = fix_hint(
                &entity,
                &found.argument,
                &found.current,
                found.vhost.as_deref(),
            );
            TopologyError::Inequivalent(Box::new(Mismatch {
                entity,
                argument: found.argument,
                wanted: found.received,
                current: found.current,
                fix,
            }))
        }
        None => TopologyError::Refused {
            entity,
            broker_text: text.to_owned(),
        },
    }
}

/// What the broker's "inequivalent arg" text says.
#[derive(Debug, PartialEq, Eq)]
struct Inequivalence {
    argument: String,
    vhost: Option<String>,
    /// What the declaration asked for, as the broker saw it.
    received: String,
    /// What the existing entity has.
    current: String,
}

/// Reads RabbitMQ's reply text for an inequivalent declaration, for instance
///
/// ```text
/// PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'attune.dlq' in vhost '/':
/// received the value '10000' of type 'long' but current is none
/// ```
///
/// (one line). The values can also read `'topic'` (exchange type, durability) or `none`. Returns
/// `None` when the text does not have this shape, so the caller keeps the raw text instead.
fn parse_inequivalence(text: &str) -> Option<Inequivalence> {
    let after_arg = text.split_once("inequivalent arg '")?.1;
    let (argument, rest) = after_arg.split_once('\'')?;
    let vhost = rest
        .split_once("in vhost '")
        .and_then(|(_, tail)| tail.split_once("':"))
        .map(|(vhost, _)| vhost.to_owned());
    let values = rest.split_once("received ")?.1;
    let (received, current) = values.split_once(" but current is ")?;
    if argument.is_empty() {
        return None;
    }
    let (received, current) = describe_pair(received.trim(), current.trim());
    Some(Inequivalence {
        argument: argument.to_owned(),
        vhost,
        received,
        current,
    })
}

/// Renders both sides of a difference; the AMQP type is named only when the values alone would
/// read the same (`10000` declared as `long` where the queue has `signedint`).
fn describe_pair(received: &str, current: &str) -> (String, String) {
    let (received_value, received_type) = split_value(received);
    let (current_value, current_type) = split_value(current);
    let with_type = |value: String, ty: Option<&str>| match ty {
        Some(ty) => format!("{value} (of AMQP type {ty})"),
        None => value,
    };
    if received_value == current_value {
        (
            with_type(received_value, received_type),
            with_type(current_value, current_type),
        )
    } else {
        (received_value, current_value)
    }
}

/// `the value '10' of type 'long'` → (`10`, `long`); `'topic'` → `topic`; `none` → `not set`;
/// anything else is kept as written.
fn split_value(text: &str) -> (String, Option<&str>) {
    if text == "none" {
        return ("not set".to_owned(), None);
    }
    if let Some(inner) = text.strip_prefix("the value '")
        && let Some((value, ty)) = inner.rsplit_once("' of type '")
    {
        return (value.to_owned(), Some(ty.strip_suffix('\'').unwrap_or(ty)));
    }
    let unquoted = text
        .strip_prefix('\'')
        .and_then(|t| t.strip_suffix('\''))
        .unwrap_or(text);
    (unquoted.to_owned(), None)
}

/// The setting an operator can change instead of deleting the entity, when one exists and the
/// existing value is one that setting can take.
fn setting_for(entity: &Entity, argument: &str, current: &str) -> Option<String> {
    match (entity, argument) {
        (Entity::Queue(DLQ), "x-max-length") => current
            .parse::<u64>()
            .ok()
            .map(|entries| format!("set dlq.max_entries to {entries}")),
        (Entity::Queue(DLQ), "x-message-ttl") => current
            .parse::<u64>()
            .ok()
            .filter(|ms| ms % MS_PER_HOUR == 0)
            .map(|ms| format!("set dlq.ttl_hours to {}", ms / MS_PER_HOUR)),
        (Entity::Queue(queue), "x-queue-type")
            if *queue != DLQ && matches!(current, "classic" | "quorum") =>
        {
            Some(format!("set rabbitmq.queue_type to {current}"))
        }
        _ => None,
    }
}

fn fix_hint(entity: &Entity, argument: &str, current: &str, vhost: Option<&str>) -> String {
    // Both tools address the default vhost unless told otherwise.
    let other_vhost = vhost.filter(|vhost| *vhost != "/");
    let mut hint = match entity {
        Entity::Queue(name) => {
            let flag = other_vhost.map_or(String::new(), |vhost| format!("-p '{vhost}' "));
            format!(
                "Queue arguments cannot be changed in place: drain it, then delete it with \
                 `rabbitmqctl delete_queue {flag}{name}` (its messages go with it) and the \
                 executor re-creates it on its next start"
            )
        }
        Entity::Exchange(name) => {
            let flag = other_vhost.map_or(String::new(), |vhost| format!("--vhost='{vhost}' "));
            format!(
                "Exchange settings cannot be changed in place: delete it (`rabbitmqadmin \
                 {flag}delete exchange name={name}` or the management UI) and the executor \
                 re-creates it and its bindings on its next start"
            )
        }
        // Bindings carry no arguments here, so the broker has nothing to compare; this is only
        // reachable if a future RabbitMQ starts to.
        Entity::Binding { .. } => "Remove the existing binding and restart the executor".to_owned(),
    };
    if let Some(setting) = setting_for(entity, argument, current) {
        hint.push_str(", or ");
        hint.push_str(&setting);
    }
    hint.push('.');
    hint
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TopologySpec {
        TopologySpec {
            queue_type: QueueKind::Classic,
            dlq_ttl_hours: 168,
            dlq_max_entries: 10_000,
        }
    }

    fn get<'a>(table: &'a FieldTable, key: &str) -> Option<&'a AMQPValue> {
        table.inner().get(key)
    }

    #[test]
    fn the_dlq_gets_its_ttl_in_milliseconds_its_length_and_drop_head() {
        let arguments = dlq_arguments(&spec()).expect("valid spec");
        assert_eq!(
            get(&arguments, "x-message-ttl"),
            Some(&AMQPValue::LongLongInt(168 * 3_600_000))
        );
        assert_eq!(
            get(&arguments, "x-max-length"),
            Some(&AMQPValue::LongLongInt(10_000))
        );
        assert_eq!(
            get(&arguments, "x-overflow"),
            Some(&long_string("drop-head"))
        );
        assert_eq!(
            get(&arguments, "x-queue-type"),
            Some(&long_string("classic"))
        );
    }

    #[test]
    fn a_ttl_longer_than_rabbitmq_allows_is_refused_naming_the_key() {
        let too_long = TopologySpec {
            dlq_ttl_hours: 87_601,
            ..spec()
        };
        let error = dlq_arguments(&too_long).expect_err("more than ten years");
        let message = error.to_string();
        assert!(message.contains("dlq.ttl_hours = 87601"), "{message}");
        assert!(message.contains("at most 87600 hours"), "{message}");
        assert!(
            dlq_arguments(&TopologySpec {
                dlq_ttl_hours: 87_600,
                ..spec()
            })
            .is_ok()
        );
        assert!(
            dlq_arguments(&TopologySpec {
                dlq_ttl_hours: u64::MAX,
                ..spec()
            })
            .is_err()
        );
    }

    #[test]
    fn executor_queues_name_their_type_and_dead_letter_to_the_dlx() {
        let quorum = executor_queue_arguments(QueueKind::Quorum, "requested");
        assert_eq!(get(&quorum, "x-queue-type"), Some(&long_string("quorum")));
        let classic = executor_queue_arguments(QueueKind::Classic, "requested");
        assert_eq!(get(&classic, "x-queue-type"), Some(&long_string("classic")));
        for arguments in [quorum, classic] {
            assert_eq!(
                get(&arguments, "x-dead-letter-exchange"),
                Some(&long_string("attune.dlx"))
            );
            assert_eq!(
                get(&arguments, "x-dead-letter-routing-key"),
                Some(&long_string("dlq.requested"))
            );
        }
    }

    #[test]
    fn routing_keys_are_built_from_the_contract_prefixes() {
        assert_eq!(
            dispatch_routing_key("core.http.get"),
            "execution.dispatch.core.http.get"
        );
        assert_eq!(dlq_routing_key("queued"), "dlq.queued");
    }

    #[test]
    fn an_argument_missing_on_the_existing_queue_reads_as_not_set() {
        let text = "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'attune.dlq' \
                    in vhost '/': received the value '10000' of type 'signedint' but current is none";
        assert_eq!(
            parse_inequivalence(text),
            Some(Inequivalence {
                argument: "x-max-length".into(),
                vhost: Some("/".into()),
                received: "10000".into(),
                current: "not set".into(),
            })
        );
    }

    #[test]
    fn differing_numbers_quoted_without_their_type_are_understood() {
        // RabbitMQ 3.10 writes numbers of compatible integer types this way.
        let text = "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 't3' in \
                    vhost 'fifo-test-1': received '6' but current is '5'";
        let found = parse_inequivalence(text).expect("parses");
        assert_eq!(found.argument, "x-max-length");
        assert_eq!(found.received, "6");
        assert_eq!(found.current, "5");
    }

    #[test]
    fn differing_values_of_the_same_type_are_shown_without_the_type() {
        let text = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue \
                    'attune.execution.requests.queue' in vhost 'v1': received the value 'quorum' \
                    of type 'longstr' but current is the value 'classic' of type 'longstr'";
        let found = parse_inequivalence(text).expect("parses");
        assert_eq!(found.received, "quorum");
        assert_eq!(found.current, "classic");
        assert_eq!(found.vhost.as_deref(), Some("v1"));
    }

    #[test]
    fn equal_values_of_different_types_name_the_types() {
        let text = "inequivalent arg 'x-max-length' for queue 'q' in vhost '/': received the \
                    value '5' of type 'long' but current is the value '5' of type 'signedint'";
        let found = parse_inequivalence(text).expect("parses");
        assert_eq!(found.received, "5 (of AMQP type long)");
        assert_eq!(found.current, "5 (of AMQP type signedint)");
    }

    #[test]
    fn an_exchange_type_difference_is_understood() {
        let text = "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'attune.dlx' in \
                    vhost '/': received 'topic' but current is 'direct'";
        let found = parse_inequivalence(text).expect("parses");
        assert_eq!(found.argument, "type");
        assert_eq!(found.received, "topic");
        assert_eq!(found.current, "direct");
    }

    #[test]
    fn text_of_another_shape_is_not_parsed() {
        for text in [
            "",
            "PRECONDITION_FAILED - something else entirely",
            "inequivalent arg '",
            "inequivalent arg '' for queue 'q': received 'a' but current is 'b'",
            "inequivalent arg 'x' for queue 'q' in vhost '/': received 'a'",
            "PRECONDITION_FAILED - queue 'q' in vhost '/' has 3 consumers",
        ] {
            assert_eq!(parse_inequivalence(text), None, "{text:?}");
        }
    }

    #[test]
    fn the_fix_for_the_dlq_length_names_the_delete_command_and_the_setting() {
        let hint = fix_hint(&Entity::Queue(DLQ), "x-max-length", "5", Some("/"));
        assert!(
            hint.contains("`rabbitmqctl delete_queue attune.dlq`"),
            "{hint}"
        );
        assert!(hint.ends_with("or set dlq.max_entries to 5."), "{hint}");
    }

    #[test]
    fn the_fix_for_the_dlq_ttl_converts_milliseconds_back_to_hours() {
        let hint = fix_hint(&Entity::Queue(DLQ), "x-message-ttl", "86400000", None);
        assert!(hint.ends_with("or set dlq.ttl_hours to 24."), "{hint}");
        let odd = fix_hint(&Entity::Queue(DLQ), "x-message-ttl", "1000", None);
        assert!(!odd.contains("dlq.ttl_hours"), "{odd}");
    }

    #[test]
    fn no_setting_is_offered_when_none_can_produce_the_existing_value() {
        let hint = fix_hint(&Entity::Queue(DLQ), "x-max-length", "not set", None);
        assert!(!hint.contains("dlq.max_entries"), "{hint}");
        let hint = fix_hint(&Entity::Queue(DLQ), "x-overflow", "reject-publish", None);
        assert!(!hint.contains(", or "), "{hint}");
    }

    #[test]
    fn the_fix_outside_the_default_vhost_names_the_vhost() {
        let hint = fix_hint(
            &Entity::Queue(REQUESTS_QUEUE),
            "x-queue-type",
            "quorum",
            Some("prod"),
        );
        assert!(
            hint.contains("`rabbitmqctl delete_queue -p 'prod' attune.execution.requests.queue`"),
            "{hint}"
        );
        assert!(
            hint.ends_with("or set rabbitmq.queue_type to quorum."),
            "{hint}"
        );
        let hint = fix_hint(&Entity::Exchange(DLX), "durable", "false", Some("prod"));
        assert!(
            hint.contains("`rabbitmqadmin --vhost='prod' delete exchange name=attune.dlx`"),
            "{hint}"
        );
    }
}
