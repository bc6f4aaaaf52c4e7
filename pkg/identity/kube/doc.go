// Package kube keeps meshcrypt's identities in the API server: [Store] implements
// identity.Store over the cluster-scoped MeshIdentity CRD, [EventHandler] feeds an informer's
// events into an identity.Allocator's cache, and [GC] deletes identities no pod uses.
//
// Store.Create is the API server's create, so it is atomic: of several agents creating the
// same MeshIdentity only one succeeds, the others get AlreadyExists, re-read the object and
// compare labels. The client given to NewStore must read through to the API server (client.New,
// not a manager's cache-backed client), or the re-read may not see the winner.
//
// # Garbage collection
//
// Identities are collected in two phases, safe with any number of collectors running at once
// (one per agent, say) and with agents allocating meanwhile:
//
//  1. A pass that finds an identity unused (not in InUse) and unmarked marks it: it sets the
//     annotation meshcrypt.io/unused-since to the current time (an update with the object's
//     resourceVersion, so it loses to any concurrent write).
//  2. A pass that finds it in use removes the mark. A pass that finds it unused and marked for
//     at least Grace deletes it, with preconditions on its UID and resourceVersion: if any
//     collector un-marked (or re-marked) it since this pass listed it, or it was deleted and
//     re-created, the delete fails with a conflict and nothing is lost.
//
// InUse is computed after the List, so an identity a pod started using before the pass is
// seen in use. What remains is an agent's informer lag: a pod created within moments of the
// delete, of a set unused for the whole grace period. Then the agents see the delete, and
// re-allocating for the pod walks the same probe sequence and re-creates the same number
// (unless a new set took it in between, when the pod simply gets a new number). Reserved
// identities (local below 256), identities of other clusters and objects whose name is not an
// identity are never touched. The grace period must exceed the clocks' skew between agents:
// each collector compares its own clock with the time another wrote.
//
// Running the collector on every agent is correct but costs a List per agent per Interval;
// a large cluster should run it where a Lease elects one agent, or lengthen Interval.
//
// # RBAC
//
// On meshidentities.meshcrypt.io (cluster-scoped): get, list, create (Store); list, watch
// (EventHandler's informer); list, update, delete (GC). No patch, no deletecollection, and no
// access to pods here: the caller computes InUse from its own pod informer.
//
// This package imports controller-runtime's client and client-go's cache types; package
// identity stays pure.
package kube
