package kube

import (
	"log/slog"

	toolscache "k8s.io/client-go/tools/cache"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/identity"
)

// EventHandler returns informer event handlers for MeshIdentity that keep a's cache current:
// adds and updates Observe, deletes (tombstones included) Forget. Objects whose name is not an
// identity are logged and ignored; log may be nil.
func EventHandler(a *identity.Allocator, log *slog.Logger) toolscache.ResourceEventHandlerFuncs {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	observe := func(obj any) {
		mi, ok := obj.(*v1alpha1.MeshIdentity)
		if !ok {
			return
		}
		id, l, err := FromObject(mi)
		if err != nil {
			log.Warn("ignoring meshidentity", "name", mi.Name, "err", err)
			return
		}
		a.Observe(id, l)
	}
	return toolscache.ResourceEventHandlerFuncs{
		AddFunc:    observe,
		UpdateFunc: func(_, obj any) { observe(obj) },
		DeleteFunc: func(obj any) {
			if t, ok := obj.(toolscache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			mi, ok := obj.(*v1alpha1.MeshIdentity)
			if !ok {
				return
			}
			if id, err := identity.Parse(mi.Name); err == nil {
				a.Forget(id)
			}
		},
	}
}
