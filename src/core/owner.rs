//! An actor together with a count of the messages on their way to it, so that it can tell
//! when nothing more can reach it and retire safely (see [`super::dormant`]).
//!
//! Every message to an action actor except its own timer passes [`Owner::admit`] first: one
//! atomic add. The actor counts what it handles; when the two counts are equal, no message
//! is in its mailbox or about to be sent, and [`Owner::close`] swaps the count for a closed
//! mark in one compare-and-swap. From then on every admission fails, and the sender goes back
//! to the registry, which holds the action's record by then and starts a new actor from it.
//! No message is ever delivered to an actor that has retired, and none is lost between the
//! two.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{ActorId, ActorRef, Message, MessagingErr, RpcReplyPort};

/// Set in `sent` once the actor has retired: no message is admitted any more.
const CLOSED: u64 = 1 << 63;

/// An actor and the messages admitted for it.
pub struct Owner<M: Message> {
    actor: ActorRef<M>,
    /// Messages admitted so far (sent, or about to be by a [`Permit`]'s holder), with
    /// [`CLOSED`] set once the actor retired.
    sent: AtomicU64,
}

impl<M: Message> std::fmt::Debug for Owner<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owner")
            .field("actor", &self.actor.get_id())
            .field("sent", &self.sent.load(Ordering::Relaxed))
            .finish()
    }
}

impl<M: Message> Owner<M> {
    pub fn new(actor: ActorRef<M>) -> Self {
        Self {
            actor,
            sent: AtomicU64::new(0),
        }
    }

    pub fn actor(&self) -> &ActorRef<M> {
        &self.actor
    }

    pub fn id(&self) -> ActorId {
        self.actor.get_id()
    }

    /// Counts one more message for the actor; false once it has retired.
    fn admit(&self) -> bool {
        // After the close the count no longer matters, so a failed admission is not undone.
        self.sent.fetch_add(1, Ordering::AcqRel) & CLOSED == 0
    }

    /// Sends a message if the actor has not retired. A retired actor's message comes back as
    /// [`MessagingErr::SendErr`], as a stopped actor's does.
    pub fn cast(&self, msg: M) -> Result<(), MessagingErr<M>> {
        if !self.admit() {
            return Err(MessagingErr::SendErr(msg));
        }
        self.actor.cast(msg)
    }

    /// Asks the actor if it has not retired (see [`Owner::cast`]).
    pub async fn call<R: Send + 'static>(
        &self,
        msg: impl FnOnce(RpcReplyPort<R>) -> M,
        timeout: Option<Duration>,
    ) -> Result<CallResult<R>, MessagingErr<M>> {
        if !self.admit() {
            return Err(MessagingErr::ChannelClosed);
        }
        self.actor.call(msg, timeout).await
    }

    /// Admits one message to be sent later, through the permit; `None` once the actor has
    /// retired. While the permit is held the actor cannot retire.
    pub fn permit(self: &Arc<Self>) -> Option<Permit<M>> {
        self.admit().then(|| Permit {
            owner: self.clone(),
            used: false,
        })
    }

    /// Closes the actor's admission for good if exactly `received` messages were admitted
    /// (all of which the actor has handled); false if more are on their way.
    pub fn close(&self, received: u64) -> bool {
        self.sent
            .compare_exchange(
                received,
                received | CLOSED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }
}

/// One admitted message, not yet sent. Dropping it unused gives the admission back.
pub struct Permit<M: Message> {
    owner: Arc<Owner<M>>,
    used: bool,
}

impl<M: Message> Permit<M> {
    pub fn owner(&self) -> &Arc<Owner<M>> {
        &self.owner
    }

    /// Sends the admitted message.
    pub fn cast(mut self, msg: M) -> Result<(), MessagingErr<M>> {
        self.used = true;
        self.owner.actor.cast(msg)
    }

    /// Asks with the admitted message.
    pub async fn call<R: Send + 'static>(
        mut self,
        msg: impl FnOnce(RpcReplyPort<R>) -> M,
        timeout: Option<Duration>,
    ) -> Result<CallResult<R>, MessagingErr<M>> {
        self.used = true;
        self.owner.actor.call(msg, timeout).await
    }
}

impl<M: Message> Drop for Permit<M> {
    fn drop(&mut self) {
        if !self.used {
            self.owner.sent.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
