//! The supervisor of all action actors.
//!
//! ```text
//!   Supervisor
//!   ├── ActionActor "core.http.get"
//!   ├── ActionActor "core.shell"
//!   └── …            (spawned on first use by the Executor)
//! ```
//!
//! An action actor that fails (a panic: a bug, since handlers return no errors) is forgotten:
//! the next message for its action starts a fresh one. What its queue held is lost from
//! memory; the ledger still has it and restores it on the next start. The supervisor itself
//! never stops because a child failed.

use std::sync::Arc;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::action::{Shared, Tenant};

/// The supervisor takes no messages of its own; it only hears supervision events.
#[derive(Debug)]
pub enum SupervisorMsg {}

pub struct Supervisor;

pub struct SupervisorArgs {
    pub shared: Arc<Shared>,
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorArgs;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // A normal stop happens at shutdown, when everything stops, and when an idle actor
        // retires, having left its record in the registry. Only failures need handling.
        if let SupervisionEvent::ActorFailed(cell, reason) = event {
            let lost = forget(st, &cell);
            tracing::error!(
                actor = %cell.get_id(),
                %reason,
                lost_live_executions = lost,
                "action actor failed; it will be started again on next use"
            );
        }
        Ok(())
    }
}

/// Drops a stopped actor from the registry and the live index; returns how many live
/// executions it still owned.
fn forget(st: &SupervisorArgs, cell: &ActorCell) -> usize {
    let id = cell.get_id();
    st.shared
        .actors
        .retain(|_, tenant| !matches!(tenant, Tenant::Awake(owner) if owner.id() == id));
    let before = st.shared.live.len();
    st.shared.live.retain(|_, owner| owner.id() != id);
    before.saturating_sub(st.shared.live.len())
}
