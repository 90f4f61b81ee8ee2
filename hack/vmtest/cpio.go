package vmtest

import (
	"bufio"
	"fmt"
	"io"
	"path"
	"sort"
	"strings"
)

// writeCPIO writes files as an uncompressed newc ("070701") archive, the
// format the kernel unpacks into its initramfs. Parent directories are
// created implicitly; file modes are 0755 so scripts are executable.
// Linux accepts this archive appended to the base image: later entries
// add to (or replace) earlier ones.
func writeCPIO(w io.Writer, files map[string][]byte) error {
	bw := bufio.NewWriter(w)
	names := make([]string, 0, len(files))
	dirs := map[string]bool{}
	for name := range files {
		clean := strings.TrimPrefix(path.Clean("/"+name), "/")
		if clean == "" || clean == "." {
			return fmt.Errorf("cpio: invalid guest path %q", name)
		}
		for d := path.Dir(clean); d != "." && d != "/"; d = path.Dir(d) {
			dirs[d] = true
		}
		names = append(names, name)
	}
	sort.Strings(names)
	dirList := make([]string, 0, len(dirs))
	for d := range dirs {
		dirList = append(dirList, d)
	}
	// Sorting puts a directory before its children ("a" < "a/b").
	sort.Strings(dirList)

	ino := uint32(1)
	for _, d := range dirList {
		if err := writeEntry(bw, ino, d, 0o040755, nil); err != nil {
			return err
		}
		ino++
	}
	for _, name := range names {
		clean := strings.TrimPrefix(path.Clean("/"+name), "/")
		if err := writeEntry(bw, ino, clean, 0o100755, files[name]); err != nil {
			return err
		}
		ino++
	}
	if err := writeEntry(bw, 0, "TRAILER!!!", 0, nil); err != nil {
		return err
	}
	return bw.Flush()
}

func writeEntry(w *bufio.Writer, ino uint32, name string, mode uint32, data []byte) error {
	nlink := uint32(1)
	if mode&0o040000 != 0 {
		nlink = 2
	}
	// Fields: ino mode uid gid nlink mtime filesize devmajor devminor
	// rdevmajor rdevminor namesize check.
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
	if _, err := w.WriteString(hdr); err != nil {
		return fmt.Errorf("cpio: write header %s: %w", name, err)
	}
	w.WriteString(name)
	w.WriteByte(0)
	pad(w, len(hdr)+len(name)+1)
	w.Write(data)
	pad(w, len(data))
	return nil
}

// pad writes zeros up to the next 4-byte boundary, as newc requires after
// the name and after the data.
func pad(w *bufio.Writer, n int) {
	for ; n%4 != 0; n++ {
		w.WriteByte(0)
	}
}
