package e2e

import (
	"testing"
	"time"

	"github.com/virtblk/virtblk/hack/vmtest"
)

func vmtestRequireRoot(t *testing.T) { vmtest.RequireRoot(t) }

// vmtestStart boots the TCG test guest with a 2-queue vhost-user-blk disk
// on sock, as vuQEMUArgs wires it for the raw-file tests.
func vmtestStart(t *testing.T, sock, script string, files map[string][]byte) *vmtest.VM {
	return vmtest.Start(t, vmtest.Config{
		Args: vuQEMUArgs(sock), Script: script, Files: files, Memory: "512M", CPUs: 2, Timeout: 4 * time.Minute,
	})
}
