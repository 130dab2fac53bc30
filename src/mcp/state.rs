//! What each tool does: the same library calls as the CLI, on a blocking thread.

use std::sync::{Arc, PoisonError};
use std::time::Instant;

use serde_json::{Value, json};

use super::State;
use super::args::*;
use crate::activity::{self, AgentState};
use crate::coordination::Coordination;
use crate::db::{Blocking, Db, DbSettings, Location, notes, runs};
use crate::error::{InstanceError, McpError, Result, RunError};
use crate::fleet_holds::Fleet;
use crate::glob::Glob;
use crate::ids::{LockName, Namespace, RunId};
use crate::lock::{Holder, Released, Request};
use crate::orchestrate::fleet::require_server_at;
use crate::orchestrate::plan::Plan;
use crate::paths;
use crate::queue;
use crate::registry::{InstanceRecord, Liveness, Registry, Snapshot};

impl State {
    /// Where this repository's locks, reservations and messages are.
    fn coordination(&self) -> Coordination {
        Coordination::new(&self.paths, &self.settings)
    }

    /// The same, with messages reaching the fleet's other hosts when the database is a server.
    fn messaging(&self) -> Result<Coordination> {
        let location = Location::resolve(self.db_flag.as_deref())?;
        Ok(self
            .coordination()
            .with_database(&location, DbSettings::from(&self.settings)))
    }

    /// The coordination with the fleet's locks and reservations when `fleet` (bad input
    /// without a server database).
    fn coordination_in(&self, fleet: bool) -> Result<Coordination> {
        if !fleet {
            return Ok(self.coordination());
        }
        require_server_at(&Location::resolve(self.db_flag.as_deref())?)?;
        Ok(self.coordination().in_fleet(self.fleet()?))
    }

    fn fleet(&self) -> Result<Fleet> {
        Ok(Fleet::new(self.db()?, &self.settings))
    }

    /// This instance as a holder; in the fleet, named by this host's fleet name.
    fn holder_in(&self, fleet: bool) -> Result<Holder> {
        let mut holder = self.holder()?;
        if fleet {
            holder.host = self.settings.fleet_host.clone();
        }
        Ok(holder)
    }

    pub(super) fn snapshot(&self) -> Result<Snapshot> {
        Registry::open_read_only(&self.paths, &self.keys)?.snapshot()
    }

    /// This server's instance as it is registered now.
    pub(super) fn record(&self, snapshot: &Snapshot) -> Result<InstanceRecord> {
        snapshot.instance(&self.me).cloned().ok_or_else(|| {
            InstanceError::Unknown {
                id: self.me.to_string(),
            }
            .into()
        })
    }

    pub(super) fn holder(&self) -> Result<Holder> {
        Ok(Holder::instance(&self.record(&self.snapshot()?)?))
    }

    /// Runs `body` with the database, opened at the first call.
    pub(super) fn with_db<T>(&self, body: impl AsyncFnOnce(&Db) -> Result<T>) -> Result<T> {
        self.db()?.run(body)
    }

    /// The database, opened at the first call.
    fn db(&self) -> Result<Arc<Blocking>> {
        // Opened under the lock: two first tools at once open it once.
        let mut slot = self.db.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(match &*slot {
            Some(db) => Arc::clone(db),
            None => {
                let settings = DbSettings::from(&self.settings);
                let db = Arc::new(Blocking::open_default(self.db_flag.as_deref(), settings)?);
                *slot = Some(Arc::clone(&db));
                db
            }
        })
    }

    pub(super) fn whoami(&self) -> Result<Value> {
        let record = self.record(&self.snapshot()?)?;
        let liveness = record.liveness(self.settings.timing.stale_after);
        let mut value = record.to_json(&liveness);
        value["repo_root"] = json!(self.paths.repo_root());
        self.add_activity(&mut value, &record, &liveness);
        Ok(value)
    }

    /// The `agent` and `progress` keys of an instance's JSON: what its supervisor last
    /// derived (null for a stale instance or one of another host).
    fn add_activity(&self, value: &mut Value, record: &InstanceRecord, liveness: &Liveness) {
        let activity = activity::live(&self.paths, record, liveness);
        value["agent"] = json!(activity.as_ref().map(|a| &a.agent));
        value["progress"] = json!(activity.as_ref().and_then(|a| a.progress));
    }

    pub(super) fn status(&self, args: &StatusArgs) -> Result<Value> {
        let state = AgentState::parse_reported(&args.state)?;
        let record = self.record(&self.snapshot()?)?;
        let stale_after = self.settings.timing.stale_after;
        let report = activity::report(
            &self.paths,
            &record,
            stale_after,
            (state, args.message.as_deref()),
        )?;
        Ok(
            json!({ "id": record.id, "state": report.state, "message": report.message, "at": report.at }),
        )
    }

    pub(super) fn list_instances(&self, args: &ListInstancesArgs) -> Result<Value> {
        let snapshot = self.snapshot()?;
        let instances: Vec<Value> = snapshot
            .valid_instances()
            .into_iter()
            .map(|record| (record, record.liveness(self.settings.timing.stale_after)))
            .filter(|(_, liveness)| args.include_stale || *liveness == Liveness::Live)
            .map(|(record, liveness)| {
                let mut value = record.to_json(&liveness);
                value["me"] = json!(record.id == self.me);
                self.add_activity(&mut value, record, &liveness);
                value
            })
            .collect();
        Ok(json!({ "instances": instances }))
    }

    pub(super) fn send_message(&self, args: SendArgs) -> Result<Value> {
        let ttl = ttl(args.ttl_seconds)?.unwrap_or(queue::DEFAULT_TTL);
        let coordination = self.messaging()?;
        let snapshot = self.snapshot()?;
        let posted = coordination.post(
            &*coordination.roster(&snapshot),
            queue::Post {
                from: self.me.to_string(),
                to: args.to,
                kind: args.kind.unwrap_or_else(|| "text".into()),
                ttl,
                payload: args.payload,
                fleet: args.fleet,
            },
        )?;
        Ok(json!({ "id": posted.id, "recipients": posted.recipients }))
    }

    pub(super) fn receive_messages(&self, args: &ReceiveArgs) -> Result<Value> {
        let limit = args.limit.unwrap_or(20);
        if !(1..=MAX_RECEIVE).contains(&limit) {
            return Err(McpError::Limit {
                limit,
                max: MAX_RECEIVE,
            }
            .into());
        }
        let deadline = Instant::now() + wait(args.wait_seconds)?;
        let store = self.messaging()?.messages()?;
        let poll = self.settings.poll_interval;
        // Watch before the first scan, so nothing arriving in between is missed.
        let arrivals = if deadline > Instant::now() {
            Some(store.arrivals(&self.me, poll, false)?)
        } else {
            None
        };
        let mut messages = loop {
            let (messages, _) = store.pending(&self.me)?;
            let left = deadline.saturating_duration_since(Instant::now());
            match &arrivals {
                Some(arrivals) if messages.is_empty() && !left.is_zero() => {
                    arrivals.wait(left.min(poll))
                }
                _ => break messages,
            }
        };
        messages.truncate(limit);
        if args.ack && !messages.is_empty() {
            let ids: Vec<String> = messages.iter().map(|m| m.id.clone()).collect();
            store.ack_all(&self.me, &ids)?;
        }
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                json!({
                    "id": m.id,
                    "from": m.from,
                    "broadcast": m.to.is_none(),
                    "type": m.kind,
                    "payload": m.payload,
                    "sent_at": m.timestamp,
                })
            })
            .collect();
        Ok(json!({ "messages": messages, "acknowledged": args.ack }))
    }

    pub(super) fn ack_message(&self, args: &AckArgs) -> Result<Value> {
        check_count("ids", args.ids.len())?;
        for id in &args.ids {
            queue::validate_id(id)?;
        }
        let store = self.messaging()?.messages()?;
        // All or nothing: every id must be one of this instance's messages.
        let unknown: Vec<&str> = args
            .ids
            .iter()
            .filter(|id| store.find(&self.me, id).is_none())
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            return Err(McpError::NotWaiting {
                ids: unknown.join(", "),
                owner: self.me.to_string(),
            }
            .into());
        }
        let (mut acknowledged, mut before) = (Vec::new(), Vec::new());
        for id in &args.ids {
            if store.ack(&self.me, id)? {
                acknowledged.push(id);
            } else {
                before.push(id);
            }
        }
        Ok(json!({ "acknowledged": acknowledged, "already_acknowledged": before }))
    }

    pub(super) fn acquire_lock(&self, args: &AcquireArgs) -> Result<Value> {
        let request = Request {
            name: LockName::parse(&args.name)?,
            holder: self.holder_in(args.fleet)?,
            ttl: ttl(args.ttl_seconds)?,
            timeout: wait(args.wait_seconds)?,
        };
        let token = self
            .coordination_in(args.fleet)?
            .locks()?
            .acquire(&request)?;
        Ok(json!({ "name": args.name, "token": token }))
    }

    pub(super) fn release_lock(&self, args: &ReleaseLockArgs) -> Result<Value> {
        let name = LockName::parse(&args.name)?;
        let locks = self.coordination_in(args.fleet)?.locks()?;
        let released = locks.release(&name, &self.holder_in(args.fleet)?, false)?;
        Ok(json!({ "name": args.name, "released": released == Released::Released }))
    }

    pub(super) fn list_locks(&self, args: &ListArgs) -> Result<Value> {
        let locks = self.coordination_in(args.fleet)?.locks()?;
        let values: Vec<Value> = locks
            .list()?
            .into_iter()
            .map(|(state, lapsed)| {
                let mut value = serde_json::to_value(&state).expect("lock states serialize");
                value["holder_text"] = json!(state.holder.as_ref().map(ToString::to_string));
                value["lapsed"] = json!(lapsed);
                value
            })
            .collect();
        Ok(json!({ "locks": values }))
    }

    pub(super) fn reserve_paths(&self, args: ReserveArgs) -> Result<Value> {
        check_count("patterns", args.patterns.len())?;
        if args
            .reason
            .as_ref()
            .is_some_and(|r| r.len() > MAX_REASON_BYTES)
        {
            return Err(McpError::ReasonTooLong {
                max: MAX_REASON_BYTES,
            }
            .into());
        }
        let globs = args
            .patterns
            .iter()
            .map(|p| Glob::parse(p))
            .collect::<Result<Vec<_>>>()?;
        let ttl = ttl(args.ttl_seconds)?;
        let fleet = args.fleet;
        let reservations = self.coordination_in(fleet)?.reservations()?;
        let reservation = reservations.reserve(
            &self.holder_in(fleet)?,
            &globs,
            args.shared,
            ttl,
            args.reason,
        )?;
        Ok(json!({
            "id": reservation.id,
            "patterns": reservation.patterns,
            "shared": reservation.shared,
        }))
    }

    pub(super) fn release_paths(&self, args: &ReleasePathsArgs) -> Result<Value> {
        check_count("patterns", args.patterns.len())?;
        let reservations = self.coordination_in(args.fleet)?.reservations()?;
        let released = reservations.release(&self.holder_in(args.fleet)?, &args.patterns)?;
        Ok(json!({ "released": released }))
    }

    pub(super) fn list_reservations(&self, args: &ListArgs) -> Result<Value> {
        let reservations = self.coordination_in(args.fleet)?.reservations()?;
        let values: Vec<Value> = reservations
            .list()?
            .into_iter()
            .filter_map(Result::ok)
            .map(|(r, lapsed)| {
                let mut value = serde_json::to_value(&r).expect("reservations serialize");
                value["holder_text"] = json!(r.holder.to_string());
                value["lapsed"] = json!(lapsed);
                value
            })
            .collect();
        Ok(json!({ "reservations": values }))
    }

    pub(super) fn check_paths(&self, args: &CheckPathsArgs) -> Result<Value> {
        check_count("paths", args.paths.len())?;
        let snapshot = self.snapshot()?;
        let record = self.record(&snapshot)?;
        let root = record
            .worktree
            .clone()
            .unwrap_or_else(|| self.paths.repo_root().to_path_buf());
        let relative = args
            .paths
            .iter()
            .map(|path| paths::relative_to(&root, &root, path))
            .collect::<Result<Vec<_>>>()?;
        let me = Holder::instance(&record);
        let mut conflicts = self
            .coordination()
            .reservations()?
            .conflicts(Some(&me), &relative)?;
        // With a server database the fleet's reservations count too.
        if let Location::Remote { .. } = Location::resolve(self.db_flag.as_deref())? {
            let me = self.holder_in(true)?;
            let fleet = self.coordination().in_fleet(self.fleet()?);
            if let Some(reservations) = fleet.fleet_reservations() {
                conflicts.extend(reservations.conflicts(Some(&me), &relative)?);
            }
        }
        let conflicts: Vec<Value> = conflicts
            .into_iter()
            .map(|(path, r)| {
                json!({
                    "path": path,
                    "holder": r.holder.instance,
                    "holder_text": r.holder.to_string(),
                    "patterns": r.patterns,
                    "reason": r.reason,
                    "since": r.created_at,
                    "reservation": r.id,
                })
            })
            .collect();
        Ok(json!({ "ok": conflicts.is_empty(), "conflicts": conflicts }))
    }

    pub(super) fn remember(&self, args: &RememberArgs) -> Result<Value> {
        let namespace = Namespace::parse(&args.namespace)?;
        notes::validate_content(&args.content)?;
        let note = self.with_db(async |db| {
            notes::add(
                db,
                &namespace,
                &args.content,
                Some(&self.me),
                Some(self.paths.repo_root()),
            )
            .await
        })?;
        Ok(json!({ "note": note }))
    }

    pub(super) fn recall(&self, args: &RecallArgs) -> Result<Value> {
        let limit = args.limit.unwrap_or(10);
        let namespace = Namespace::parse(&args.namespace)?;
        notes::validate_limit(limit)?;
        notes::fts_query(&args.query)?;
        let found =
            self.with_db(async |db| notes::search(db, &namespace, &args.query, limit).await)?;
        Ok(json!({ "notes": found }))
    }

    pub(super) fn run_status(&self) -> Result<Value> {
        self.with_db(async |db| self.run_status_in(db).await)
    }

    pub(super) async fn run_status_in(&self, db: &Db) -> Result<Value> {
        let claim = &self.settings.caller;
        let task = match (
            nonempty(claim.run_id.as_deref()),
            nonempty(claim.task_id.as_deref()),
        ) {
            // A text that is no run id names no run.
            (Some(run), Some(task)) => match RunId::parse(&run) {
                Some(run) => runs::tasks(db, &run)
                    .await?
                    .into_iter()
                    .find(|row| row.task_id == task),
                None => None,
            },
            _ => runs::task_of_instance(db, &self.me).await?,
        };
        let Some(task) = task else {
            return Ok(json!({
                "run": null,
                "note": format!("instance {} is not a task of an orchestrated run", self.me),
            }));
        };
        let run = runs::get(db, &task.run_id)
            .await?
            .ok_or_else(|| RunError::Missing {
                id: task.run_id.to_string(),
            })?;
        let tasks = runs::tasks(db, &run.id).await?;
        let plan = Plan::of_run(&run).ok();
        let depends_on = plan
            .as_ref()
            .and_then(|plan| plan.task(&task.task_id))
            .map(|t| t.depends_on.clone())
            .unwrap_or_default();
        let dependencies: Vec<Value> = depends_on
            .iter()
            .filter_map(|id| tasks.iter().find(|t| t.task_id == *id))
            .map(|t| json!({ "task_id": t.task_id, "status": t.status, "branch": t.branch }))
            .collect();
        Ok(json!({
            "run": {
                "id": run.id,
                "name": run.name,
                "status": run.status,
                "started_at": run.started_at,
                "finished_at": run.finished_at,
                "integration": plan.and_then(|plan| plan.integration),
            },
            "task": task,
            "dependencies": dependencies,
        }))
    }
}

/// A claim that is set and not empty.
fn nonempty(claim: Option<&str>) -> Option<String> {
    claim.filter(|value| !value.is_empty()).map(str::to_string)
}
