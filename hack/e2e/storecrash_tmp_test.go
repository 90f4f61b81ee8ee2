package e2e

import (
	"math/rand/v2"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestTmpRawGuestKill(t *testing.T) {
	bin := vuBuildVirtblkd(t)
	dir := vuTempDir(t)
	img := vuImage(t, dir)
	sock := filepath.Join(dir, "vu.sock")
	d1 := vuStart(t, bin, sock, img)
	rng := rand.New(rand.NewPCG(1, 2))
	pattern, second := make([]byte, 4<<20), make([]byte, 8<<20)
	for i := range pattern {
		pattern[i] = byte(rng.Uint32())
	}
	for i := range second {
		second[i] = byte(rng.Uint32())
	}
	vm := vmtestStart(t, sock, scGuestScript, map[string][]byte{"/hostpattern": pattern, "/second": second})
	if err := vm.WaitConsole("SC-WRITTEN", 5*time.Minute); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	d1.cmd.Process.Signal(syscall.SIGKILL)
	<-d1.done
	d2 := vuStart(t, bin, sock, img)
	res := vm.Wait()
	if res.ExitCode != 0 || !strings.Contains(res.Console, "SC-ALL-OK") {
		t.Fatalf("raw: guest exit %d\n%s\n%s", res.ExitCode, res.Console, d2.logs())
	}
	t.Logf("raw ok: %s", d2.logs())
}
