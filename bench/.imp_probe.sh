for i in 1 2 3; do
python3 -c "import time;t=time.time();import jax;a=time.time();jax.devices();b=time.time();import llm_jax.serve.__main__;c=time.time();print('serial: jax %.2f devices %.2f rest %.2f total %.2f'%(a-t,b-a,c-b,c-t))" 2>&1 | grep serial
python3 -c "import time,threading;t=time.time();import jax;a=time.time();th=threading.Thread(target=jax.devices);th.start();import llm_jax.serve.__main__;c=time.time();th.join();d=time.time();print('overlap: jax %.2f imports %.2f join %.2f total %.2f'%(a-t,c-a,d-c,d-t))" 2>&1 | grep overlap
done
