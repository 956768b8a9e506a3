//! [`Plugins`]: every configured instance, loaded from `weir.toml`, and the chain of each model.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::{Chain, Instance};
use crate::config::Config;
use crate::plugin::PluginError;
use crate::plugin::deps::check_order;
use crate::plugin::host::{HostLookups, PluginMetrics};
use crate::state::StateStore;

/// Every configured plugin instance, and the chain of each model.
#[derive(Debug, Default)]
pub struct Plugins {
    global: Chain,
    models: HashMap<String, Chain>,
    /// Model names the global plugins serve (a routing plugin's aliases), in config order.
    served_models: Vec<String>,
}

impl Plugins {
    /// No plugins at all.
    pub fn empty() -> Plugins {
        Plugins::default()
    }

    /// Loads every instance in `cfg` (global `[[plugins]]`, then each model's), checking
    /// manifests, configs against their schemas, and running each plugin's `init`. Any error
    /// fails the whole load, so a config that loads serves.
    pub fn load(
        cfg: &Config,
        state: Arc<dyn StateStore>,
        metrics: &PluginMetrics,
    ) -> Result<Plugins, PluginError> {
        Self::load_with(cfg, state, metrics, Arc::new(HostLookups::default()))
    }

    /// [`Plugins::load`] with what the host offers plugins beyond state: target
    /// statistics and prices.
    pub fn load_with(
        cfg: &Config,
        state: Arc<dyn StateStore>,
        metrics: &PluginMetrics,
        lookups: Arc<HostLookups>,
    ) -> Result<Plugins, PluginError> {
        let base = cfg.path.parent().unwrap_or_else(|| Path::new("."));
        let mut global: Vec<Arc<Instance>> = Vec::new();
        let mut served_models: Vec<String> = Vec::new();
        for (i, p) in cfg.file.plugins.iter().enumerate() {
            let instance = Instance::load(
                base,
                p,
                &format!("plugins[{i}]"),
                state.clone(),
                metrics,
                lookups.clone(),
            )?;
            for name in instance.manifest().served_models(p.config.as_ref()) {
                if !served_models.contains(&name) {
                    served_models.push(name);
                }
            }
            global.push(instance);
        }
        // Declared metadata dependencies: a reader before its provider is refused at load
        // (so by `weir check` and on reload too), naming both plugins.
        let order =
            |list: &[Arc<Instance>]| check_order(list.iter().map(|i| (i.name(), i.manifest())));
        order(&global).map_err(|e| e.at("plugins"))?;
        let global_chain = Chain::new(global.clone()).map_err(|reason| PluginError::Config {
            key: "plugins".into(),
            reason,
        })?;
        let mut models = HashMap::new();
        for (i, m) in cfg.file.models.iter().enumerate() {
            if m.plugins.is_empty() {
                continue;
            }
            let mut instances = global.clone();
            for (j, p) in m.plugins.iter().enumerate() {
                instances.push(Instance::load(
                    base,
                    p,
                    &format!("models[{i}].plugins[{j}]"),
                    state.clone(),
                    metrics,
                    lookups.clone(),
                )?);
            }
            order(&instances).map_err(|e| e.at(format!("models[{i}].plugins")))?;
            let chain = Chain::new(instances).map_err(|reason| PluginError::Config {
                key: format!("models[{i}].plugins"),
                reason,
            })?;
            models.insert(m.name.clone(), chain);
        }
        Ok(Plugins {
            global: global_chain,
            models,
            served_models,
        })
    }

    /// The instance named `name` in any chain (admin endpoints).
    pub fn instance(&self, name: &str) -> Option<&Arc<Instance>> {
        self.global
            .instance(name)
            .or_else(|| self.models.values().find_map(|c| c.instance(name)))
    }

    /// Every distinct instance, global ones first.
    pub fn instances(&self) -> Vec<&Arc<Instance>> {
        let mut out: Vec<&Arc<Instance>> = self.global.instances().iter().collect();
        for chain in self.models.values() {
            for inst in chain.instances() {
                if !out.iter().any(|i| Arc::ptr_eq(i, inst)) {
                    out.push(inst);
                }
            }
        }
        out
    }

    /// A single chain used for every model (tests, the harness).
    pub fn from_chain(chain: Chain) -> Plugins {
        Plugins {
            global: chain,
            models: HashMap::new(),
            served_models: Vec::new(),
        }
    }

    /// Model names the global plugins declare they serve (`serves_models` in their
    /// manifests), in config order, without duplicates.
    pub fn served_models(&self) -> &[String] {
        &self.served_models
    }

    /// The chain of `model`: the global instances, then the model's own, in config order.
    pub fn chain(&self, model: &str) -> &Chain {
        self.models.get(model).unwrap_or(&self.global)
    }
}
