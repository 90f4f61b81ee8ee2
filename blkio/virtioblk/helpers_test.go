package virtioblk_test

import "github.com/virtblk/virtblk/storage"

type storageReq struct{ r storage.Request }
