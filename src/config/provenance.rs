//! Which layer (the file, an environment variable or the built-in default) set a key, so that
//! every error can say where the value it complains about came from.

use serde_yaml_ng::Value;

use super::env::EnvOverride;
use super::error::Origin;

/// What the file and the environment set, to say where a value came from.
pub(super) struct Provenance<'a> {
    pub(super) file: Option<(&'a str, &'a Value)>,
    pub(super) env: &'a [EnvOverride],
}

impl Provenance<'_> {
    /// Origin of the value at `path` as deserialized (an error there, or a whole section that
    /// failed, is blamed on the innermost source that wrote at or below it).
    pub(super) fn origin_of(&self, path: &[String]) -> Origin {
        if let Some(over) = self.env.iter().find(|over| over.path == path) {
            return Origin::Env(over.var.clone());
        }
        if let Some((name, tree)) = self.file
            && lookup(tree, path).is_some()
        {
            return Origin::File(name.to_owned());
        }
        // A missing required key inside a mapping: blame whoever wrote into that mapping.
        if let Some(over) = self.env.iter().find(|over| over.path.starts_with(path)) {
            return Origin::Env(over.var.clone());
        }
        match self.file {
            Some((name, _)) => Origin::File(name.to_owned()),
            None => Origin::Default,
        }
    }

    /// Origin of a value that passed deserialization: the environment, the file, or neither.
    pub(super) fn origin_of_value(&self, path: &[&str]) -> Origin {
        if let Some(over) = self.env.iter().find(|over| over.path == path) {
            return Origin::Env(over.var.clone());
        }
        match self.file {
            Some((name, tree)) if lookup(tree, path).is_some() => Origin::File(name.to_owned()),
            _ => Origin::Default,
        }
    }
}

pub(super) fn lookup<'v, S: AsRef<str>>(tree: &'v Value, path: &[S]) -> Option<&'v Value> {
    path.iter()
        .try_fold(tree, |node, key| node.as_mapping()?.get(key.as_ref()))
}
