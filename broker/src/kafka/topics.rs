//! What several handlers need of the metadata image: topic ids to names (Fetch v13+ names
//! topics by id, KIP-516) and a partition's current leader with its endpoint (KIP-951: Fetch
//! v16+ and Produce v10+ tell a client that reached the wrong broker where the leader is).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;

use crate::cluster::metadata::Image;

/// Topic id -> topic name of one image.
pub type NamesById = HashMap<uuid::Uuid, String>;

thread_local! {
    /// The last image's id map, rebuilt only when the shard's image changes.
    static NAMES_BY_ID: RefCell<Option<(Arc<Image>, Rc<NamesById>)>> = const { RefCell::new(None) };
}

/// The topic names of `image` by topic id. Built once per image and shard (topics change
/// rarely; fetches come many times a second).
pub fn names_by_id(image: &Arc<Image>) -> Rc<NamesById> {
    NAMES_BY_ID.with(|cell| {
        let mut cell = cell.borrow_mut();
        if let Some((cached, names)) = cell.as_ref() {
            if Arc::ptr_eq(cached, image) {
                return names.clone();
            }
        }
        let names: Rc<NamesById> = Rc::new(
            image
                .topics
                .iter()
                .map(|(name, t)| (t.id, name.clone()))
                .collect(),
        );
        *cell = Some((image.clone(), names.clone()));
        names
    })
}

/// A broker's client endpoint: (host, port, rack).
pub type Endpoint = (String, i32, Option<String>);

/// KIP-951: the leader and leader epoch the image has for a partition ((-1, -1) when there is
/// no such partition), and the leader's endpoint when it is a live broker. As Kafka's
/// `getCurrentLeader` does for NOT_LEADER_OR_FOLLOWER and FENCED_LEADER_EPOCH answers.
pub fn current_leader(image: &Image, topic: &str, partition: i32) -> (i32, i32, Option<Endpoint>) {
    let Some(p) = image.topics.get(topic).and_then(|t| {
        usize::try_from(partition)
            .ok()
            .and_then(|i| t.partitions.get(i))
    }) else {
        return (-1, -1, None);
    };
    let endpoint = image
        .brokers
        .get(&p.leader)
        .filter(|b| !b.fenced)
        .map(|b| (b.host.clone(), b.port, b.rack.clone()));
    (p.leader, p.leader_epoch, endpoint)
}

/// The endpoints a response's `node_endpoints` lists: each leader named once, by node id.
#[derive(Default)]
pub struct NodeEndpoints(BTreeMap<i32, Endpoint>);

impl NodeEndpoints {
    pub fn add(&mut self, node: i32, endpoint: Option<Endpoint>) {
        if let Some(e) = endpoint {
            self.0.entry(node).or_insert(e);
        }
    }

    pub fn into_entries(self) -> impl Iterator<Item = (i32, Endpoint)> {
        self.0.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::metadata::{BrokerMeta, PartitionMeta, TopicMeta};

    fn image() -> Image {
        let mut image = Image::default();
        let part = |leader| PartitionMeta {
            shard: 0,
            leader_epoch: 7,
            replicas: vec![1, 2],
            isr: vec![1, 2],
            leader,
            partition_epoch: 0,
            adding: vec![],
            removing: vec![],
        };
        image.topics.insert(
            "t".into(),
            TopicMeta {
                id: uuid::Uuid::from_u128(42),
                partitions: vec![part(2), part(3)],
                configs: Default::default(),
                internal: false,
            },
        );
        for (id, fenced) in [(1, false), (2, false), (3, true)] {
            image.brokers.insert(
                id,
                BrokerMeta {
                    host: "h".into(),
                    port: 9000 + id,
                    rack: None,
                    fenced,
                },
            );
        }
        image
    }

    #[test]
    fn ids_map_to_names_and_follow_the_image() {
        let a = Arc::new(image());
        let names = names_by_id(&a);
        assert_eq!(names[&uuid::Uuid::from_u128(42)], "t");
        assert!(Rc::ptr_eq(&names, &names_by_id(&a)), "cached per image");
        let mut b = image();
        b.topics.get_mut("t").unwrap().id = uuid::Uuid::from_u128(43);
        let b = Arc::new(b);
        let names = names_by_id(&b);
        assert!(!names.contains_key(&uuid::Uuid::from_u128(42)));
        assert_eq!(names[&uuid::Uuid::from_u128(43)], "t");
    }

    #[test]
    fn current_leaders_name_live_endpoints_only() {
        let image = image();
        assert_eq!(
            current_leader(&image, "t", 0),
            (2, 7, Some(("h".into(), 9002, None)))
        );
        assert_eq!(current_leader(&image, "t", 1), (3, 7, None), "fenced");
        assert_eq!(current_leader(&image, "t", 2), (-1, -1, None));
        assert_eq!(current_leader(&image, "u", 0), (-1, -1, None));
        let mut e = NodeEndpoints::default();
        e.add(2, Some(("h".into(), 9002, None)));
        e.add(2, Some(("h".into(), 9002, None)));
        e.add(3, None);
        assert_eq!(e.into_entries().count(), 1);
    }
}
