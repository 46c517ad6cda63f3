//! One instance of a group over its life: its connection, its durable consumer handle
//! and its advisory listener, and their replacement when the client dies.
//!
//! async-nats's reader panics on a header value that holds a lone carriage return
//! (`x: a\rb`), which nats-server passes on; that client then never answers again.
//! The fetch loop notices (its pull fails and the client takes no more commands) and
//! ends; the instance lets its lanes finish the events in hand, opens a new connection
//! and goes on with the messages the dead one held and queued (`fetch::Carried`). A
//! fetch loop begins with a scan of what the group was delivered and not acked
//! (`undeliverable::scan`), which terminates such a message before it is pulled
//! again, so it cannot kill the new client too.

use super::builder::attach;
use super::context::Ctx;
use super::fetch::{self, Carried};
use super::undeliverable;
use super::ConsumerError;
use crate::support::retry::{backoff, sleep_or_stop};
use async_nats::jetstream::consumer::{pull, PullConsumer};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One incarnation of an instance: what dies with its client.
pub(super) struct Instance {
    /// What its fetch loop and lanes share, the client among them.
    pub ctx: Arc<Ctx>,
    /// The group's durable consumer, on this client.
    consumer: PullConsumer,
    /// Records the messages JetStream gave up delivering, on this client.
    listener: JoinHandle<()>,
}

impl Instance {
    /// An incarnation on `ctx.nats`, with its advisory listener started.
    pub async fn start(ctx: Arc<Ctx>, consumer: PullConsumer) -> Result<Instance, ConsumerError> {
        let listener = undeliverable::spawn_listener(ctx.clone(), ctx.nats.clone())
            .await
            .map_err(|e| ConsumerError::JetStream {
                group: ctx.group.clone(),
                stream: ctx.inner.config.stream.clone(),
                reason: format!("cannot listen for max-deliveries advisories: {e}"),
            })?;
        Ok(Instance {
            ctx,
            consumer,
            listener,
        })
    }
}

/// Runs the instance until it is told to stop or fails, with a new incarnation each
/// time its client dies.
pub(super) async fn run(mut instance: Instance, config: pull::Config, stop: watch::Receiver<bool>) {
    let mut carried = Carried::default();
    loop {
        let ctx = instance.ctx.clone();
        let ended = fetch::run(
            ctx,
            instance.consumer,
            stop.clone(),
            instance.listener,
            carried,
        );
        let Some(next) = ended.await else {
            return;
        };
        if instance.ctx.failure.borrow().is_some() {
            // The instance failed (a lane died) as its client died: it stops; what it
            // had comes back after ack_wait, to the group's other instances.
            return;
        }
        carried = next;
        match reborn(&instance.ctx, &config, stop.clone()).await {
            Some(next) => instance = next,
            None => return,
        }
    }
}

/// Whether the client's connection task has ended: it no longer takes commands. (One
/// that is only reconnecting takes them later; this waits a second at most.)
pub(super) async fn client_gone(client: &async_nats::Client) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), client.server_pool()).await,
        Ok(Err(_))
    )
}

/// A new incarnation of `ctx`'s instance on a new connection, retried with backoff;
/// `None` if told to stop first.
async fn reborn(
    ctx: &Ctx,
    config: &pull::Config,
    mut stop: watch::Receiver<bool>,
) -> Option<Instance> {
    tracing::error!(
        group = %ctx.group,
        "the consumer's NATS client died (its reader panics on a message whose header \
         value holds a lone carriage return); reconnecting with a new client"
    );
    let mut attempt = 0;
    loop {
        attempt += 1;
        let next = async {
            let (nats, consumer) = attach(&ctx.inner, &ctx.group, config.clone()).await?;
            Instance::start(Arc::new(ctx.reborn(nats)), consumer).await
        };
        match next.await {
            Ok(instance) => {
                tracing::info!(group = %ctx.group, "the consumer instance goes on with a new client");
                return Some(instance);
            }
            Err(error) => {
                tracing::warn!(%error, group = %ctx.group, "cannot reconnect the consumer instance; retrying");
                let delay = backoff(ctx.settings.retry_base, ctx.settings.retry_max, attempt);
                if sleep_or_stop(&mut stop, delay).await {
                    return None;
                }
            }
        }
    }
}
